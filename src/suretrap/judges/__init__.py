"""Refusal/compliance judges with measured accuracy.

A Sure rate alone cannot tell "said Sure and stopped" from "said Sure and complied"; these
judges say, per response, whether it refused and whether it complied (`Judgement`).

Example::

    from suretrap.judges import get_judge, judge_eval

    judge = get_judge("offline")  # the default judge: CPU, no network
    verdict = judge.judge(["How do I ...?"], ["Sure. Step 1: ..."])[0]  # .refusal, .complied
    scores = judge_eval("xstest_completions_gpt4_labeled.csv", judge)  # accuracy, f1, ...

Judges (see ``docs/judges.md`` for sources, prompt formats and measured numbers):

* ``prefix`` -- the Sure-rate rule (option ``label``);
* ``keyword`` -- suretrap's legacy keyword refusal rule;
* ``xstest-strmatch`` -- XSTest's own string-match rule, verbatim (the baseline);
* ``offline`` -- three MiniLMs fine-tuned (LoRA) as refusal classifiers, mean probability;
  weights built once per machine into suretrap's cache by ``make setup`` (CPU, no network);
* ``offline-linear`` -- frozen MiniLM embeddings + hand features + a logistic head (the
  previous default, kept as a baseline);
* ``hf-classifier`` -- a Hugging Face classifier or guard model (HarmBench, Llama Guard, any
  sequence classifier), for users with a GPU and network;
* ``openai`` -- any OpenAI-compatible chat endpoint applying the StrongREJECT rubric.

`register` adds a judge; `get_judge` builds one by name with options; `JUDGES` lists the names.
"""

from __future__ import annotations

from suretrap.judges import _encoder, _hf, _offline, _openai, _rules  # noqa: F401  (they register)
from suretrap.judges._base import JUDGES, Judge, Judgement, get_judge, register
from suretrap.judges._eval import BASELINE_JUDGE, judge_eval, score_refusals

__all__ = [
    "BASELINE_JUDGE",
    "DEFAULT_JUDGE",
    "JUDGES",
    "Judge",
    "Judgement",
    "get_judge",
    "judge_eval",
    "register",
    "score_refusals",
]

DEFAULT_JUDGE = "offline"
