"""Recipe variants of experiments/resnet18.py (20 epochs, batch 512, ResNet18), for ``cifar_jax.sweep``.

    python -m cifar_jax.sweep --config experiments/resnet18.py --variants experiments/sweeps/recipe.py \
        --seeds 0 1 --workdir runs/sweep_recipe

Each variant changes the augmentation strength, label smoothing, schedule shape or peak learning rate;
results are in docs/recipes.md.
"""


def get_variants():
    return {
        "original": ["augment.cutout=16", "optim.label_smoothing=0.0", "optim.schedule=onecycle", "optim.lr=0.2"],
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
