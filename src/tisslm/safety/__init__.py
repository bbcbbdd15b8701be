"""Safety on what the model says, applied wherever text leaves the system.

- `filters`: the content filter (toxicity, PII, secrets, destructive shell commands) and its
  policy, and `OutputGuard`, which filters a stream a checked line at a time;
- `watermark`: Kirchenbauer et al.'s keyed green-list watermark and its z-test detector;
- `audit`: the hash-chained JSONL audit log, anchored by a signed head file, that the server and
  TissLang runs write and `tisslm audit verify` checks;
- `measure`: what the `safety` DVC stage measures (filter precision/recall on `labelled.jsonl`,
  watermark detection and false positives, quality cost) and whether `safety.goals` are reached;
- `red_team`: the red-team prompts through a real `tisslm serve`, with and without the filter;
- `commands`: `tisslm safety scan`, `tisslm watermark detect`, `tisslm audit verify`.
"""
