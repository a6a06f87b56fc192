"""The security layers after sampling, as one generation request goes through them.

:meth:`safelatent.api.Pipeline.generate` screens the prompts first (:mod:`safelatent.safety.gate`, layers
1-2: prompt policy, SLD for suppressed categories) and, once the images are decoded, hands them to
:class:`SecurityLayers` — configured entirely by the policy file:

3. **output classifiers** (``[outputs]``): every classifier the policy lists scores every image; the
   per-category actions (keep / blur / withhold, :func:`~safelatent.safety.classifiers.actions.
   apply_actions`) decide what is returned, with the reasons. A withheld image is ``None`` — never a
   black square;
4. **provenance** (``[provenance]``): the invisible watermark on every returned image of at least
   256×256 pixels, payload id = the first 3 bytes of SHA-256(``"<request id>:<index>"``)
   (:mod:`~safelatent.safety.watermark`); smaller images (the toy model's 32×32) are recorded as
   "not marked" with the reason. C2PA signing happens when the files are written
   (:mod:`safelatent.output`), PNG ``parameters`` too;
5. **audit** (``[audit]``): one row per request in the append-only log (:mod:`~safelatent.safety.audit`)
   — generated, partially withheld, withheld, or blocked before any compute — with the prompt (or only
   its hash), the settings, model and adapter hashes, each layer's decisions and scores, and one
   perceptual hash per image (of the generated pixels; no pixels are stored, withheld or not).

Classifiers and audit databases are opened once per process and shared (NudeNet's ONNX session, a CLIP
model for Q16, an SQLite connection), so each request pays only for the work itself.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InvalidArgumentError
from .audit import AuditEntry, AuditImage, AuditLog, default_audit_db, derive_outcome
from .classifiers import Classifier, ClassifierResult, run_classifiers
from .classifiers.actions import apply_actions
from .policy_file import ACTIONS, CLASSIFIER_CATEGORIES, Policy
from .prompt_policy import PolicyDecision

__all__ = ["ImageSafety", "SecurityLayers", "WatermarkStatus", "get_classifier", "new_request_id"]


def new_request_id() -> str:
    """A random request id (32 hex digits)."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class WatermarkStatus:
    """Whether an image carries the invisible watermark: ``content_id`` (6 hex digits) when it does,
    else ``reason`` ("off in the policy", "image is 32×32; ...", "withheld")."""

    embedded: bool
    content_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class ImageSafety:
    """What the output layers decided for image ``index``: ``action`` (keep / blur / withhold) and its
    ``reasons``, every classifier's ``scores`` (``{classifier: {category: score}}``), the watermark, and
    the perceptual hash of the generated pixels (the audit log's fingerprint, when the policy keeps one)."""

    index: int
    action: str
    reasons: tuple[str, ...]
    scores: dict[str, dict[str, float]]
    watermark: WatermarkStatus
    #: imagehash pHash of the generated pixels (the audit log's fingerprint; ``None`` without an audit log)
    phash: str | None

    @property
    def withheld(self) -> bool:
        return self.action == "withhold"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_CLASSIFIERS: dict[tuple[str, str], Classifier] = {}
_AUDIT_LOGS: dict[Path, AuditLog] = {}
_SHARED_LOCK = threading.Lock()


def get_classifier(name: str, q16_clip: str | os.PathLike | None = None) -> Classifier:
    """The output classifier ``name`` (``nudenet``, ``q16`` with a local CLIP folder, ``toy``), loaded once
    per process and configuration and then shared (NudeNet's ONNX session, the CLIP model)."""
    key = (name, str(q16_clip) if name == "q16" else "")
    with _SHARED_LOCK:
        if key not in _CLASSIFIERS:
            if name == "nudenet":
                from .classifiers.nudenet import NudeNetClassifier

                _CLASSIFIERS[key] = NudeNetClassifier()
            elif name == "toy":
                from .classifiers.toy import ToyClassifier

                _CLASSIFIERS[key] = ToyClassifier()
            elif name == "q16":
                from .classifiers.q16 import Q16Classifier

                if q16_clip is None:
                    raise InvalidArgumentError(
                        "the q16 classifier needs a local CLIP folder", "pass q16_clip"
                    )
                _CLASSIFIERS[key] = Q16Classifier(q16_clip)
            else:
                raise InvalidArgumentError(
                    f"unknown classifier {name!r}", f"use one of: {', '.join(CLASSIFIER_CATEGORIES)}"
                )
        return _CLASSIFIERS[key]


def _audit_log(path: Path | None) -> AuditLog:
    """The audit log at ``path`` (default :func:`default_audit_db`, read at each call), opened once."""
    resolved = (path or default_audit_db()).expanduser().resolve()
    with _SHARED_LOCK:
        log = _AUDIT_LOGS.get(resolved)
        if log is None:
            log = _AUDIT_LOGS[resolved] = AuditLog(resolved)
        return log


def _scores(results: Sequence[ClassifierResult]) -> dict[str, dict[str, float]]:
    return {r.classifier: {c: float(s) for c, s in r.scores.items()} for r in results}


@dataclass
class OutputsResult:
    """The images as returned (``None`` where withheld; blurred copies where blurred) and one
    :class:`ImageSafety` per generated image."""

    images: list[Image.Image | None]
    safety: list[ImageSafety] = field(default_factory=list)


class SecurityLayers:
    """Layers 3-5 for one policy (see the module docs). Stateless apart from shared, lazily opened
    classifiers and audit connections; safe to use from several threads."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    @property
    def classifiers(self) -> list[Classifier]:
        """The policy's output classifiers (loaded on first use, then shared in the process)."""
        outputs = self.policy.outputs
        return [get_classifier(name, outputs.q16_clip) for name in outputs.classifiers]

    def process_outputs(self, images: Sequence[Image.Image], *, request_id: str) -> OutputsResult:
        """Classify, act on and watermark the generated ``images`` (layers 3 and 4)."""
        from .audit import image_phash

        outputs = self.policy.outputs
        per_image = run_classifiers(self.classifiers, images)  # [[], ...] when the policy lists none
        actions = {c: (a.action, a.threshold) for c, a in outputs.actions.items()}
        decisions = apply_actions(images, per_image, actions, blur_radius=outputs.blur_radius)
        returned: list[Image.Image | None] = []
        safety: list[ImageSafety] = []
        for index, (image, results, decision) in enumerate(zip(images, per_image, decisions, strict=True)):
            final, mark = self._watermark(decision.image, f"{request_id}:{index}")
            returned.append(final)
            safety.append(
                ImageSafety(
                    index=index,
                    action=decision.action,
                    reasons=tuple(decision.reasons),
                    scores=_scores(results),
                    watermark=mark,
                    phash=image_phash(image) if self.policy.audit.enabled else None,
                )
            )
        return OutputsResult(returned, safety)

    def _watermark(self, image: Image.Image | None, tag: str) -> tuple[Image.Image | None, WatermarkStatus]:
        from . import watermark

        if image is None:
            return None, WatermarkStatus(False, reason="withheld")
        if not self.policy.provenance.watermark:
            return image, WatermarkStatus(False, reason=f"off in policy {self.policy.name!r}")
        too_small = watermark.unsupported_reason(image)
        if too_small is not None:
            return image, WatermarkStatus(False, reason=too_small)
        payload = watermark.WatermarkPayload.for_tag(tag)
        marked = watermark.embed(image, payload)
        marked.info.update(image.info)  # e.g. the blur's reasons
        return marked, WatermarkStatus(True, content_id=f"{payload.content_id:06x}")

    # -- layer 5 ---------------------------------------------------------------------------------------

    def record(
        self,
        *,
        request_id: str,
        prompts: Sequence[str],
        decisions: Sequence[PolicyDecision] | None,
        settings: Mapping[str, Any],
        model_hash: str | None,
        adapters: Sequence[Mapping[str, Any]] = (),
        sld: Mapping[str, Any] | None = None,
        safety: Sequence[ImageSafety] = (),
        refusal: str | None = None,
        error: str | None = None,
    ) -> int | None:
        """Append the request to the audit log (unless the policy turns the log off); returns the row id.

        ``refusal``: the message of a request refused before any compute (a blocked prompt, an attempt
        to relax a hard block); the row's outcome is then ``blocked``. ``error``: what made an accepted
        request fail (outcome ``error``).
        """
        audit = self.policy.audit
        if not audit.enabled:
            return None
        policy_layer: dict[str, Any] = {"policy": self.policy.name, "source": self.policy.source}
        if decisions:
            order = ACTIONS.index  # weakest to strongest
            policy_layer.update(
                action=max((d.action for d in decisions), key=order),
                actions={c: max((d.actions[c] for d in decisions), key=order) for c in decisions[0].actions},
                message=next((d.message for d in decisions if d.message), ""),
                decisions=[d.as_dict() for d in decisions],
            )
        if refusal is not None:
            policy_layer.update(action="block", message=refusal)
        images = [
            AuditImage(
                phash=s.phash,
                withheld=s.withheld,
                action=s.action,
                reasons=s.reasons if s.action != "keep" else (),
            )
            for s in safety
        ]
        entry = AuditEntry(
            prompt="\n".join(prompts),
            request_id=request_id,
            normalized_prompt="\n".join(d.normalized_text for d in decisions) if decisions else None,
            store_prompt=audit.store_prompt,
            settings=settings,
            model_hash=model_hash,
            adapters=[{k: a.get(k) for k in ("name", "hash", "weight", "format")} for a in adapters],
            prompt_policy=policy_layer,
            sld={"enabled": bool(sld), **(sld or {})},
            classifiers=[
                {"index": s.index, "action": s.action, "reasons": list(s.reasons), "scores": s.scores}
                for s in safety
            ]
            if self.policy.outputs.classifiers
            else None,
            provenance={"watermark": [asdict(s.watermark) for s in safety]} if safety else None,
            images=images,
            outcome=(
                "blocked"
                if refusal is not None
                else "error"
                if error is not None
                else derive_outcome(False, images)
            ),
            reasons=[error] if error is not None else None,
        )
        return _audit_log(audit.path).record(entry)
