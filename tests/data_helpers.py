"""What the data tests share: the small tokenizer layout they train and a quiet HTTP handler."""
from __future__ import annotations

import http.server

VOCAB, PAD, SEQ_LEN = 512, 485, 16
MODEL = [f"model.vocab_size={VOCAB}", "model.bos_token_id=480", "model.eos_token_id=481",
         f"model.pad_token_id={PAD}", "model.end_turn_token_id=484"]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass
