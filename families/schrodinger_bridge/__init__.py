"""Schrödinger bridges between two point sets (data.name at t = 0, data.target at t = 1): forward and backward
drifts fitted by IPF (De Bortoli et al. 2021, mean matching) or DSBM (Shi et al. 2023, bridge matching) against a
reference process (Brownian motion or the VP SDE), walked by Euler-Maruyama. Its own train, sample and evaluate
bodies (stages.py); the library is bridge.py (drifts, walks, costs) and solvers.py (the two fits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from families.base import Family, FamilyParams, Plan
from pipeline.names import POINT_SETS


class BridgeParams(BaseModel):
    """method.sb: the reference process, its sigma, the solver, its iterations and the time grid."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    solver: Literal["ipf", "dsbm"] = "ipf"
    sigma: float = Field(1.0, gt=0.0)
    reference: Literal["brownian", "vp"] = "brownian"
    iterations: int = Field(10, ge=1)
    num_steps: int = Field(20, ge=2)


class SchrodingerBridgeParams(FamilyParams):
    """The bridge's own method.* keys: its section method.sb."""

    sb: BridgeParams = Field(default_factory=BridgeParams)


# train.*, sample.* and eval.* keys the bridge's own loop (solvers.py) and walk do not read, at their defaults.
UNREAD = (("train", "devices"), ("train", "precision"), ("train", "compile"), ("train", "channels_last"),
          ("train", "accumulate"), ("train", "warmup"), ("train", "eval_every"), ("sample", "devices"),
          ("sample", "sampler"), ("sample", "steps"), ("sample", "task"), ("eval", "likelihood"))


class SchrodingerBridge(Family):
    name = "schrodinger_bridge"
    paper = "De Bortoli et al. 2021 (IPF); Shi et al. 2023 (DSBM)"
    Params = SchrodingerBridgeParams
    stages = "families.schrodinger_bridge.stages"
    own_stages = ("train", "sample", "evaluate")
    has_score = False
    posthoc_ema = False

    def process_kind(self, sde: str) -> str:
        if sde != "auto":
            raise ValueError(f"method.sde: {sde} does not apply to method.name: schrodinger_bridge, whose reference "
                             f"process is method.sb.reference (brownian or vp); leave method.sde: auto")
        return "bridge"

    def loss(self, kind: str, loss: str) -> Optional[str]:
        if loss != "auto":
            raise ValueError(f"method.name: schrodinger_bridge trains with its solver's own regression "
                             f"(method.sb.solver: ipf or dsbm); leave method.loss: auto, got {loss}")
        return "bridge"

    def parameterization(self, loss: Optional[str], parameterization: str, scale_by_sigma: bool) -> str:
        super().parameterization(loss, parameterization, scale_by_sigma)  # kernel is refused there
        if parameterization not in ("auto", "drift"):
            raise ValueError(f"method.name: schrodinger_bridge's two networks output drifts; leave "
                             f"method.parameterization: auto (or drift), got {parameterization}")
        return "drift"

    def sampler(self, kind: str, sampler: str) -> str:
        if sampler != "auto":
            raise ValueError(f"sample.sampler: {sampler} walks a score model from noise; a Schrödinger bridge is "
                             f"sampled by walking its learned drift from one data set to the other (leave "
                             f"sample.sampler: auto, and pick the way with sample.direction)")
        return "bridge"

    def check_likelihood(self, kind: str) -> None:
        raise ValueError("eval.likelihood: true computes a score model's likelihood; method.name: schrodinger_bridge "
                         "is evaluated by cd / emd at its end and the cost of its coupling (leave eval.likelihood: false)")

    def check_distill(self) -> None:
        raise ValueError("distill.method: a consistency model maps noise to data; a Schrödinger bridge maps one data "
                         "set to another with its own walk (leave distill.method: none)")

    def check_conditional(self) -> None:
        raise ValueError("method.conditional: a Schrödinger bridge has no class-conditional form here; use "
                         "method.name ddpm, sde, ncsnv2, ncsn or edm for guided generation")

    def sb(self, m: Any) -> BridgeParams:
        """method.sb of `m` (MethodParams; None: the defaults) as BridgeParams."""
        return self.params(m).sb

    def check(self, cfg: Any, plan: Plan) -> None:
        """A target set of points, and only the keys the bridge's loop reads."""
        d, m = cfg.data, cfg.method
        self.check_owned(m)
        if m.conditional:
            self.check_conditional()
        sb = self.sb(m)
        if d.kind == "images":  # a data.name: file of images is refused by the train stage, once prepare read it
            raise ValueError(f"method.name: schrodinger_bridge runs between point sets (N, D); data.name: {d.name} "
                             f"is images (points: {', '.join(POINT_SETS)}, or a file of points)")
        if d.target is None:
            raise ValueError("method.name: schrodinger_bridge needs data.target: the distribution at t = 1 (a 2-D "
                             f"set: {', '.join(POINT_SETS)}; gaussian, N(0, I); or file with data.target_path)")
        if d.target == "file":
            path = Path(d.target_path) if d.target_path is not None else None
            if path is None or not _is_file(path):
                raise ValueError(f"data.target: file needs data.target_path to name an existing .npy or .csv file "
                                 f"of points (N, D), got {d.target_path!r}")
            if path.suffix.lower() not in (".npy", ".csv"):
                raise ValueError(f"data.target_path must end in .npy or .csv, got {d.target_path!r}")
        if sb.reference != "brownian" and sb.sigma != BridgeParams().sigma:
            raise ValueError(f"method.sb.sigma scales the Brownian reference; method.sb.reference: {sb.reference} "
                             f"has its own noise schedule (leave method.sb.sigma: {BridgeParams().sigma})")
        defaults = type(cfg)()
        for section, key in UNREAD:
            value, default = getattr(getattr(cfg, section), key), getattr(getattr(defaults, section), key)
            if value != default:
                shown = str(default).lower() if isinstance(default, bool) else default  # as YAML writes it
                raise ValueError(f"{section}.{key} does not apply to method.name: schrodinger_bridge, which trains "
                                 f"its two drifts in one process and samples by walking them over "
                                 f"method.sb.num_steps steps (leave {section}.{key}: {shown})")

    def build_process(self, kind: str, m: Any, sigmas: Sequence[float]):
        """The reference (method.sb.reference): Brownian motion dX = sigma dW on [0, 1], or the VP SDE (beta
        0.1 -> 20 on [0, 1], as method.name: sde), whose bridge to N(0, I) is close to the score SDE."""
        from pipeline.processes import VPSDE, BrownianMotion

        sb = self.sb(m)
        return BrownianMotion(sb.sigma) if sb.reference == "brownian" else VPSDE(t_min=0.0)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name the OS cannot look up
        return False


FAMILY = SchrodingerBridge()
