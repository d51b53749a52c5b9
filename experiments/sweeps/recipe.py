"""Recipe variants of experiments/resnet18.py (20 epochs, batch 512, ResNet18), for ``cifar_jax.sweep``.

    python -m cifar_jax.sweep --config experiments/resnet18.py --variants experiments/sweeps/recipe.py \
        --seeds 0 1 2 --workdir runs/sweep_recipe --only original original_he cut8_ls0.1 cut8_ls0.1_he

Each recipe changes the augmentation strength, label smoothing, schedule shape or peak learning rate, and comes
twice: NAME with PyTorch's default initialisation (the original's, ``model.init=pytorch``) and NAME_he with
torchvision's He init (what every recipe measured before 2026-12-07 used). Results are in docs/recipes.md.
"""

RECIPES = {
    # The original's: one-cycle Nesterov SGD with PyTorch OneCycleLR's default momentum cycle, cutout 16.
    "original": ["augment.cutout=16", "optim.label_smoothing=0.0", "optim.schedule=onecycle", "optim.lr=0.2",
                 "optim.momentum_range=(0.85,0.95)"],
    "cut8": ["augment.cutout=8", "optim.label_smoothing=0.0", "optim.schedule=onecycle", "optim.lr=0.2"],
    "cut0": ["augment.cutout=0", "optim.label_smoothing=0.0", "optim.schedule=onecycle", "optim.lr=0.2"],
    "cut8_ls0.1": ["augment.cutout=8", "optim.label_smoothing=0.1", "optim.schedule=onecycle", "optim.lr=0.2"],
    "cut0_ls0.1": ["augment.cutout=0", "optim.label_smoothing=0.1", "optim.schedule=onecycle", "optim.lr=0.2"],
    "cut8_ls0.1_lr0.4": ["augment.cutout=8", "optim.label_smoothing=0.1", "optim.schedule=onecycle", "optim.lr=0.4"],
    "cut8_ls0.1_linear": ["augment.cutout=8", "optim.label_smoothing=0.1", "optim.schedule=linear",
                          "optim.warmup_fraction=0.2", "optim.lr=0.2"],
    "cut12_ls0.2_linear": ["augment.cutout=12", "optim.label_smoothing=0.2", "optim.schedule=linear",
                           "optim.warmup_fraction=0.2", "optim.lr=0.2"],
}


def get_variants():
    variants = {}
    for name, overrides in RECIPES.items():
        variants[name] = [*overrides, "model.init=pytorch"]
        variants[f"{name}_he"] = [*overrides, "model.init=he"]
    return variants
