"""The content filter: what a prompt or an output holds that the policy flags, redacts or blocks.

Four categories (`CATEGORIES`), each found by the component made for it:
- toxicity: alt-profanity-check's linear SVM, shipped inside its wheel (works offline), scoring
  each line in plain Python from its exported numbers (`tisslm.safety.toxicity`: no scikit-learn
  at scan time). It learned from comments on the web, where "kill", "slave" and "hard" are
  alarming; in code they are jargon. `JARGON` phrases are hidden from the classifier, so
  "kill -9 the child process" passes while "kill -9 the child, you moron" does not.
- pii and secrets: the clean stage's own anonymiser (`tisslm.data.anonymize`), so that the
  model's outputs are held to the rules its training data was.
- shell: destructive commands (`SHELL_PATTERNS`): rm -rf of a root or home, fork bombs, mkfs
  or dd onto a disk, piping a download into a shell, wiping history or the firewall.

The policy (params.yaml `safety.filters.policy`) says per category: allow, flag (pass the text,
record the finding), redact (replace the span by a placeholder) or block (refuse a prompt; end
an output before the span). Toxicity is a score of a line, not a span to cut out: redact acts
as block for it.

`OutputGuard` applies the filter to text that arrives token by token: it releases only whole
lines that have been checked, so nothing blocked is ever sent first and retracted after.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cache

from tisslm.core.config import AnonymizeParams, ContentFilterParams, FilterAction, FilterPolicy, Params
from tisslm.data.anonymize import find_personal_data

CATEGORIES = ("toxicity", "pii", "secrets", "shell")
SEVERITY: dict[str, int] = {"allow": 0, "flag": 1, "redact": 2, "block": 3}
SHELL_PLACEHOLDER = "<SHELL_COMMAND>"

# Programming jargon that a classifier trained on web comments reads as abuse. Each pattern needs
# its technical context (a signal, a process, a bus, a branch), so that the same verbs aimed at
# people are still seen.
_PROCESSES = (
    r"(?:child(?:ren)?|parent|process(?:es)?|subprocess(?:es)?|thread|job|worker|task|daemon|server|container"
    r"|pod|session|zombie|orphan|instance|query|connection|pid|app|service|loop|program|build|run|tab)s?"
)
JARGON = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        rf"\b(?:kill|pkill|killall|terminate|abort|reap|stop|suspend|fork|spawn|orphan(?:ed)?)(?:s|ed|ing)?"
        rf"(?:\s+-{{1,2}}[\w-]+)*(?:\s+(?:%?\d+|\$\w+|the|a|an|all|any|its|every|each|this|that|old|stale|hung|dead"
        rf"|zombie|orphan(?:ed)?|running|idle|background|foreground|remaining|stuck)){{0,3}}\s+{_PROCESSES}\b",
        r"\b(?:kill|pkill|killall)\s+-{1,2}\w+",  # kill -9, kill -SIGTERM, pkill -f
        rf"\b(?:zombie|orphan(?:ed)?|dead|hung|stuck|runaway)\s+{_PROCESSES}\b",
        r"\b(?:master|slave|primary|replica)s?\s*(?:/|-|and|&)\s*(?:master|slave|primary|replica)s?\b",
        r"\bslaves?\s+(?:device|node|server|replica|database|db|mode|port|address|select|bus|instance|thread)s?\b",
        r"\bmaster\s+(?:branch|node|server|database|db|process|thread|key|list|boot|file|copy|password|plan)\b",
        r"\b(?:sql|dependency|code|command|fault|header)\s+injections?\b",
        r"\binject(?:s|ed|ing)?\s+(?:the\s+|a\s+)?(?:dependency|dependencies|service|mock|config|fault)\b",
        r"\bexecut(?:e|es|ed|ing|ion)\s+(?:the\s+|a\s+)?(?:payload|query|command|script|statement|plan|code|task"
        r"|test|job|request|function|callback|binary|order)s?\b",
        r"\b(?:core\s+dump(?:ed)?|dump(?:s|ed|ing)?\s+(?:the\s+)?core|crash\s+dump|heap\s+dump)\b",
        r"\b(?:hard|soft)\s+(?:reset|link|limit|fork|wrap|tab|delete|kill|stop|fail|error|dependency)s?\b",
        r"--hard\b",
        r"\bgit\s+[a-z][\w-]*",  # git's verbs (reset, bisect, blame), and its HEAD below
        r"(?-i:\bHEAD\b)",
        r"\b(?:dead\s*lock|race\s+condition|hang(?:s|ing)?\s+(?:forever|on|when|until|indefinitely))\b",
        r"\b(?:black|white|block|allow)\s*list(?:s|ed|ing)?\b",
        r"\bnuke\s+(?:the\s+)?(?:cache|build|dir|directory|node_modules|db|database|venv|container)s?\b",
        r"\bpenetration\s+test(?:s|ing|er)?\b",
        r"\b(?:SIGKILL|SIGTERM|SIGABRT|SIGSEGV|SIGINT|SIGHUP|SIGQUIT)\b",
        r"\bkill(?:ed)?\s+by\s+signal\b",
    )
)

# Destructive shell commands, Unix and Windows. A path counts as a root when nothing follows its
# first segment: `rm -rf /` and `rm -rf ~/` are caught, `rm -rf ./build` and `rm -rf /tmp/x` are not.
_ROOT = r"(?:/\*?|~/?\*?|\$HOME/?\*?|\$\{HOME\}/?|/(?:home|etc|usr|var|boot|root|bin|lib|opt|srv|dev)/?\*?)(?![\w.~/-])"
_DISK = r"/dev/(?:sd|hd|vd|xvd|nvme|mmcblk|disk)\w*"
SHELL_PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (
        # deleting a root, a home, the system's directories or its logs
        rf"\brm\s+(?:-[a-zA-Z]*[rRf][a-zA-Z]*\s+|--(?:recursive|force|no-preserve-root)\s+)+[\"']?{_ROOT}",
        r"\brm\s+-\w*[rRf]\w*\s+/var/log\b",
        r"\bfind\s+/\s[^\n]*(?:-delete\b|-exec\s+rm\b)",
        r"\bmv\s+(?:~|/|\$HOME)/?\s+/dev/null\b",
        r"\bRemove-Item\b[^\n]*-Recurse\b[^\n]*\b[A-Za-z]:\\\*?(?=\s|$|[\"'])",
        r"\b(?:rd|rmdir)\s+/s\s+/q\s+[A-Za-z]:\\(?=\s|$)|\bdel\s+/[fsq]\b[^\n]*\b[A-Za-z]:\\\*",
        r"\bformat\s+[A-Za-z]:(?=\s|$)",
        # fork bombs
        r"(\w+|:)\s*\(\)\s*\{\s*\1\s*\|\s*\1\s*&\s*\}\s*;\s*\1",  # :(){ :|:& };:
        r"\bwhile\s+(?:True|1)\s*:\s*(?:\n\s*)?os\.fork\(\)|\bfork\s+while\s+fork\b",
        # wiping or overwriting disks
        rf"\bmkfs(?:\.\w+)?\b[^\n]*{_DISK}",
        rf"\bdd\s+[^\n]*\bof={_DISK}",
        rf">\s*{_DISK}\b",
        rf"\bshred\b[^\n]*(?:{_DISK}|_history\b)",
        # opening the system up
        r"\bchmod\s+(?:-\w+\s+)*[0-7]?777\s+/(?![\w.-])",
        r"\bchown\s+-R\s+\S+\s+/(?![\w.-])",
        r"(?:>|\btee\b(?:\s+-a)?|\bcp\s+\S+)\s+/etc/(?:passwd|shadow|sudoers|group)\b|\bNOPASSWD:\s*ALL\b",
        r"\b(?:curl|wget)\s[^\n|]*\|\s*(?:sudo\s+)?(?:ba|z|k|da)?sh\b",
        r"/dev/tcp/|\bnc\b[^\n]*\s-e\s+/bin/\w*sh\b|\bbash\s+-i\s+>&",  # reverse shells
        # stopping everything, hiding tracks, lowering defences
        r"\bkill\s+-(?:9|KILL|SIGKILL)\s+-1\b|/proc/sysrq-trigger",
        r"\bhistory\s+-c\b|\bunset\s+HISTFILE\b|\bHISTSIZE=0\b|\bln\s+-sf\s+/dev/null\s+~/\.\w*_history\b",
        r"\bcrontab\s+-r\b|\bauditctl\s+-e\s*0\b|\b(?:service\s+auditd\s+stop|systemctl\s+stop\s+auditd)\b",
        r"\biptables\s+-F\b|\bufw\s+disable\b|\bsystemctl\s+(?:stop|disable)\s+firewalld\b|\bsetenforce\s+0\b",
        r"\bnetsh\s+advfirewall\s+set\s+\w+\s+state\s+off\b|\bSet-MpPreference\s+-Disable\w+\s+\$true\b",
    )
)


@dataclass(frozen=True)
class Finding:
    """One thing the filter found: its category, the span of the text, and what the policy does."""

    category: str
    start: int
    end: int
    kind: str  # the anonymiser's kind (EMAIL, SECRET, ...), TOXIC or SHELL
    action: FilterAction
    score: float | None = None  # the classifier's probability, for toxicity

    @property
    def placeholder(self) -> str:
        return SHELL_PLACEHOLDER if self.kind == "SHELL" else f"<{self.kind}>"


@dataclass(frozen=True)
class Verdict:
    """What may leave: `text` redacted and, when blocked, cut before the first blocked span."""

    text: str
    action: FilterAction  # the strongest action taken
    findings: list[Finding] = field(default_factory=list)
    blocked_at: int | None = None  # offset in the scanned text where a block cut it

    @property
    def blocked(self) -> bool:
        return self.blocked_at is not None

    def decisions(self) -> list[dict]:
        """Per category and action, how many findings: what the audit log and the API report."""
        counts: dict[tuple[str, str], int] = {}
        for finding in self.findings:
            if finding.action != "allow":
                key = (finding.category, finding.action)
                counts[key] = counts.get(key, 0) + 1
        return [{"category": c, "action": a, "count": n} for (c, a), n in counts.items()]

    def to_json(self) -> dict:
        return {
            "action": self.action,
            "blocked_at": self.blocked_at,
            "text": self.text,
            "findings": [asdict(f) for f in self.findings],
        }


@cache
def _toxicity_classifier():
    # Loaded on first use, from the numbers `toxicity` exported to its JSON cache: a few
    # milliseconds; the first run of a machine (no cache yet) takes profanity_check's 2 s.
    from tisslm.safety.toxicity import load

    return load().predict_prob


# Numbers and hex ids are no words of abuse, yet the classifier's vocabulary holds some ("1400").
NOT_WORDS = re.compile(r"\b\w*\d\w*\b")


def hide_jargon(line: str) -> str:
    """What the classifier reads of a line: its words, less the programming jargon it misreads."""
    for pattern in JARGON:
        line = pattern.sub(" ", line)
    return NOT_WORDS.sub(" ", line)


def _lines(text: str) -> Iterable[tuple[int, int]]:
    start = 0
    for line in text.splitlines(keepends=True):
        yield start, start + len(line.rstrip("\r\n"))
        start += len(line)


class ContentFilter:
    """Finds each category's spans and applies the policy; one per process is enough (it is stateless)."""

    def __init__(self, params: ContentFilterParams, anonymize: AnonymizeParams | None = None):
        self.params = params
        self.policy = params.policy.model_dump()
        self.anonymize = anonymize or AnonymizeParams()

    @classmethod
    def from_params(cls, params: Params) -> ContentFilter:
        """The filter every producer applies: safety.filters' policy, finding personal data and
        secrets with the clean stage's anonymiser settings (clean.anonymize)."""
        return cls(params.safety.filters, params.clean.anonymize)

    @property
    def active(self) -> bool:
        """Whether any category does more than allow; an inactive filter never changes text."""
        return any(action != "allow" for action in self.policy.values())

    def scan(self, text: str) -> list[Finding]:
        """Every finding of the active categories, in text order."""
        findings: list[Finding] = []
        if self.policy["toxicity"] != "allow":
            findings += self.toxic_lines(text)
        if self.policy["pii"] != "allow" or self.policy["secrets"] != "allow":
            for span in find_personal_data(text, self.anonymize):
                category = "secrets" if span.kind == "SECRET" else "pii"
                if self.policy[category] != "allow":
                    findings.append(Finding(category, span.start, span.end, span.kind, self.policy[category]))
        if self.policy["shell"] != "allow":
            for pattern in SHELL_PATTERNS:
                findings += [Finding("shell", *m.span(), "SHELL", self.policy["shell"]) for m in pattern.finditer(text)]
        return sorted(findings, key=lambda f: (f.start, f.end))

    def toxic_lines(self, text: str, threshold: float | None = None) -> list[Finding]:
        """The lines the classifier scores at or above `threshold` (default: the params')."""
        spans = [(start, end) for start, end in _lines(text) if text[start:end].strip()]
        if not spans:
            return []
        scores = _toxicity_classifier()([hide_jargon(text[start:end]) for start, end in spans])
        action = self.policy["toxicity"]
        action = "block" if action == "redact" else action
        threshold = self.params.toxicity_threshold if threshold is None else threshold
        return [
            Finding("toxicity", start, end, "TOXIC", action, round(float(score), 4))
            for (start, end), score in zip(spans, scores, strict=True)
            if score >= threshold
        ]

    def apply(self, text: str) -> Verdict:
        """The text as the policy lets it out: redacted spans replaced, cut at the first block."""
        if not self.active:
            return Verdict(text, "allow")
        findings = self.scan(text)
        blocked_at = min((f.start for f in findings if f.action == "block"), default=None)
        end = len(text) if blocked_at is None else blocked_at
        pieces, last = [], 0
        for finding in findings:
            if finding.action != "redact" or finding.start < last or finding.end > end:
                continue  # inside a span already replaced, or past the cut
            pieces += [text[last : finding.start], finding.placeholder]
            last = finding.end
        pieces.append(text[last:end])
        action = max((f.action for f in findings), key=SEVERITY.__getitem__, default="allow")
        return Verdict("".join(pieces), action, findings, blocked_at)


def flag_everything(params: ContentFilterParams) -> ContentFilter:
    """A filter that finds every category and only flags: to measure the detectors, whatever the policy."""
    return ContentFilter(params.model_copy(update={"policy": FilterPolicy(**dict.fromkeys(CATEGORIES, "flag"))}))


class OutputGuard:
    """The filter over a stream: `add` text as it is generated, get back what may be sent.

    A line is released only once it is complete (or the output ends), after the filter has seen
    everything up to it, so a span that a later token completes (an email, a key) is caught
    before any of it leaves. Each release is what the filter makes of the whole text so far,
    less what was already sent; should the filter ever rewrite text already sent (a span
    reaching back across a line), the guard blocks: it fails closed.
    """

    def __init__(self, content_filter: ContentFilter):
        self.filter = content_filter
        self.raw = ""
        self.checked = 0  # how much of `raw` the filter has seen
        self.sent = ""
        self.verdict = Verdict("", "allow")
        self.blocked = False

    def add(self, text: str) -> str:
        """What may be sent now of the text so far; "" while a line is incomplete or once blocked."""
        self.raw += text
        if not self.filter.active:
            return self._release(Verdict(self.raw, "allow"))
        complete = self.raw.rfind("\n") + 1
        if complete <= self.checked:
            return ""
        self.checked = complete
        return self._release(self.filter.apply(self.raw[:complete]))

    def finish(self) -> str:
        """What remains to be sent once the output has ended."""
        return self._release(self.filter.apply(self.raw))

    def _release(self, verdict: Verdict) -> str:
        if self.blocked:
            return ""
        if not verdict.text.startswith(self.sent):
            verdict = Verdict(self.sent, "block", verdict.findings, len(self.sent))
        self.verdict = verdict
        self.blocked = verdict.blocked
        released = verdict.text[len(self.sent) :]
        self.sent = verdict.text
        return released
