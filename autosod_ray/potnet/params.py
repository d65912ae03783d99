"""POTNet's parameters: a plain value the config builds (potnet/ knows nothing of config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class POTNetParams:
    """Every setting that decides a mask; names match `POTNetConfig` (docs there)."""

    seed: str = "ncut"  # step 0: a name in SEEDS
    seed_tau: float = 0.2
    seed_orientation: str = "attention"
    select_tau: float = 0.5  # step 2
    num_clusters: int = 3  # step 3: K per class
    clustering: str = "dual"  # a name in CLUSTERINGS
    fusion: str = "smooth"  # a name in FUSIONS
    eta_threshold: float = 0.5
    engine: str = "native"  # a name in CLUSTER_ENGINES
    kmeans_iters: int = 20
    assign_temperature: float = 0.1
    spectral_knn: int = 10
    transport: bool = True  # step 4
    marginal: str = "class_prior"  # a name in MARGINALS
    marginal_temperature: float = 0.1
    ot_epsilon: float = 0.05
    ot_max_iters: int = 1000
    ot_tol: float = 1e-4  # L1 row error; float32 plateaus near 1e-5 on some images
    reweight: bool = True  # step 5
    map_temperature: float = 0.1
    refine_steps: int = 5  # step 6: gradient steps on L_con (ECSSD sweep: README)
    refine_lr: float = 3.0
    border_prior: str = "prototypes"  # boundary prior: a name in BORDER_PRIORS
    border_sigma: float = 0.4  # geodesic scale of a region (feature distance 1 - cos)
    border_threshold: float = 0.8  # `prototypes`: move a foreground prototype above this w_bg
