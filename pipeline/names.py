"""The names a user picks in params.yaml, each list written once; config, the library and the docs derive from them.

No torch here: every stage loads params through pipeline.config, and the short stages (report, ema) must start fast.
The method names are the registry's (families.NAMES).
"""

# Data sets (pipeline.data): generated or analytic 2-D sets, image sets, and a user's file (points or images).
POINT_SETS = ("swissroll", "moons", "checkerboard", "8gaussians", "gmm")
IMAGE_SETS = ("digits", "photos", "fashion_mnist", "mnist", "cifar10", "folder")
DATA_SETS = (*POINT_SETS, "file", *IMAGE_SETS)
# The image sets stored with one channel (their data.channels: auto is 1).
GREY_SETS = ("digits", "fashion_mnist", "mnist")
# The 2-D sets with classes (pipeline.data.toy2d.toy_label_splits); every image set has labels.
LABELLED_POINTS = ("moons", "8gaussians", "gmm")
# A Schrödinger bridge's other end (data.target): a 2-D set, N(0, I) or a file of points.
TARGETS = (*POINT_SETS, "gaussian", "file")

# The SDEs of method.sde (Song et al. 2021; OU: Huang et al. 2021's example).
SDES = ("vp", "ve", "subvp", "ou")
# Samplers (pipeline.samplers); FAST_SAMPLERS need only the marginals at the grid's times, so they walk any score
# model's grid: a continuous process, DDPM's chain or NCSN's scales (pipeline.samplers.fast).
SAMPLERS = ("annealed_langevin", "ancestral", "ddim", "pc", "ode", "edm_heun", "dpm_solver", "consistency")
FAST_SAMPLERS = ("edm_heun", "dpm_solver")
# The samplers a flow's velocity walks: the ODE's, and DPM-Solver++ on the data prediction the velocity gives
# (consistency too, once distilled: distill.method).
VELOCITY_SAMPLERS = ("ode", "dpm_solver")
# Losses a user can name (method.loss); the registry's own losses (pipeline.losses) are resolved from them.
LOSSES = ("dsm", "eps_mse", "ism", "ssm", "elbo")
# What a score network outputs (pipeline.parameterization); "kernel" is Sohl-Dickstein's learned mean and variance,
# "velocity" flow matching's dx_t/dt.
SCORE_PARAMETERIZATIONS = ("score", "score_over_sigma", "eps", "x0", "drift")
PARAMETERIZATIONS = (*SCORE_PARAMETERIZATIONS, "kernel", "velocity")
# How flow matching pairs noise with data in a batch (method.fm.coupling): independently (Lipman et al. 2023) or by
# the exact optimal transport of the batch (Tong et al. 2023).
COUPLINGS = ("independent", "minibatch_ot")

# distill.method: what the distill stage trains from the final model besides method.fm.reflow's reflows: nothing, or
# a consistency model, by consistency distillation (Song et al. 2023) or easy consistency tuning (Geng et al. 2024),
# sampled with sample.sampler: consistency.
DISTILL_METHODS = ("none", "cd", "ect")

# ema.method: how the ema stage makes the final model from training's outputs (pipeline.train.finalize).
EMA_METHODS = ("decay", "posthoc", "none")
# train.lr_decay: the learning rate over the run after any warm-up (pipeline.train.state.lr_factor)
LR_DECAYS = ("none", "linear", "cosine")

# sample.task: controllable generation with one unconditional (or null-label) model.
TASKS = ("generate", "inpaint", "inverse", "interpolate", "edit")
# sample.inpaint.method and .mask (pipeline.inpaint), sample.inverse.method and .operator (pipeline.inverse).
INVERSE_METHODS = ("replace", "langevin", "repaint", "mcg", "dps")
INPAINT_METHODS = INVERSE_METHODS
OPERATORS = ("mask", "colorize", "downsample", "blur", "matrix")
MASKS = ("box", "half", "random", "first")
