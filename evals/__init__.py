"""Evaluation across test-time depths.

lm_adapter (the lm-eval model `rdp`), runner (scoring / generation at a depth), cache (KV
caches across recurrence steps), adaptive (per-token exit criteria), sweep + report (`rdp
eval`: results JSON, Markdown table, plot), gsm8k (local GSM8K tasks), humaneval + sandbox
(sandboxed pass@k), reasoning (synthetic tasks and `rdp reasoning`), harness (lm-eval CLI),
lm_eval_plugin (`lm_eval --model rdp`), tokenizer + chat (prompt framing, chat templates),
checkpoint_info (which weights a result measured), task_names (tasks checked up front).
See docs/evals.md.
"""
