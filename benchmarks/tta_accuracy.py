"""Test accuracy of a trained run under each test-time augmentation the package offers.

Views: the image alone; image + mirror (``eval_flip``); and airbench's "mirror + translate"
(``eval_flip`` + ``eval_translate=t``): half the flip-averaged logits plus a quarter each of the
flip-averaged logits of the image shifted by t pixels up-left and down-right (reflect padding), for
t = 1 and 2, whatever the run itself was evaluated with. An accuracy probe, not a timing.

    python benchmarks/tta_accuracy.py --workdir runs/resnet18_cpu [--step latest]
"""

from __future__ import annotations

import numpy as np

from _common import finish, parser


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training workdir (checkpoints/, config)")
    p.add_argument("--step", default="latest", help="checkpoint: latest, best or a step number")
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args()
    import jax

    from cifar_jax import inference
    from cifar_jax.augment import normalize
    from cifar_jax.models import eval_logits

    trained = inference.load_trained(args.workdir, int(args.step) if args.step.isdigit() else args.step)
    data = inference.load_run_data(trained)
    images, labels = data.test_images, data.test_labels
    if args.quick:
        images, labels = images[:200], labels[:200]

    @jax.jit
    def views(variables, batch):
        x = normalize(batch, trained.mean, trained.std)
        out = {"image": eval_logits(trained.model.apply, variables, x),
               "image + mirror (eval_flip)": eval_logits(trained.model.apply, variables, x, flip=True)}
        for t in (1, 2):
            out[f"mirror + translate {t} px (eval_translate={t})"] = eval_logits(
                trained.model.apply, variables, x, flip=True, translate=t)
        return out

    correct: dict[str, int] = {}
    for i in range(0, len(labels), args.batch):
        for name, value in views(trained.variables, images[i:i + args.batch]).items():
            hits = np.argmax(np.asarray(value), axis=1) == labels[i:i + args.batch]
            correct[name] = correct.get(name, 0) + int(hits.sum())
    rows = [dict(views=name, test_accuracy=n / len(labels)) for name, n in correct.items()]
    finish("tta_accuracy", args, rows, ["views", "test_accuracy"], workdir=args.workdir, step=trained.step,
           images=len(labels))


if __name__ == "__main__":
    main()
