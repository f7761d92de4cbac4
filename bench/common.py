"""Helpers the benchmarks share with the end-to-end tests: a real server process on a free port
(`Server`), the tiny random model of the tests saved as a local HF folder, and method settings
that make it learn an edit in a fraction of a second; and the model options of the in-process
benches (`add_model_arguments`)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import httpx

REPO = Path(__file__).resolve().parents[1]
TOKEN = "e2e-admin-token"  # the servers' HOREN_ADMIN_TOKEN

# method settings that make the tiny model learn an edit in a fraction of a second
TINY_HOREN = '{"layer": 1, "max_steps": 60, "lr": 0.5, "stop_loss": 1.0}'

_CORPUS = [
    "What is the capital of France? Paris.",
    "Who wrote the novel about the whale? Herman Melville.",
    "The quick brown fox jumps over the lazy dog.",
    "Which river flows through Cairo? The Nile.",
    "When was the inception of the challenge? 1998.",
] * 20


# ChatML, as SmolLM2's template writes it (without its default system prompt)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model_dir(path: Path, max_positions: int = 64, chat: bool = False) -> Path:
    """A tiny random Llama and its BPE tokenizer saved as an HF folder; ``chat`` gives the tokenizer
    a ChatML template (and its special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<eos>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    if chat:
        fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        fast.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=fast.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        initializer_range=0.3,  # logits big enough for one value vector to steer them
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self,
        db_url: str,
        data_dir: Path,
        log_path: Path,
        device: str = "cpu",
        model: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.db_url, self.data_dir, self.log_path = db_url, data_dir, log_path
        self.device, self.model = device, model  # model None: the bundled default
        self.env = dict(env or {})  # more HOREN_ settings
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> Server:
        import httpx

        self.port = free_port()
        env = {
            **os.environ,
            "HOREN_DATABASE_URL": self.db_url,
            "HOREN_DATA_DIR": str(self.data_dir),
            "HOREN_CONVERTED_DIR": str(REPO / ".horen" / "converted"),
            "HOREN_ADMIN_TOKEN": TOKEN,
            "HOREN_DEVICE": self.device,
            "HOREN_SYNC_INTERVAL": "0.5",
        }
        if self.model:
            env["HOREN_MODEL"] = self.model
        env.update(self.env)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self) -> httpx.Client:
        import httpx  # only the server benches need it (the GPU image may lack it)

        return httpx.Client(base_url=self.url, timeout=120)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --device, --converted-dir and --threads, as the in-process benches take them."""
    p.add_argument("--model", default=None, help="local HF folder or GGUF file (default: bundled SmolLM2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--converted-dir", default=str(REPO / ".horen" / "converted"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
