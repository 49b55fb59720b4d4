"""Train a GLIF network: one process, or DDP under torchrun (also installed as `glif2-train`).

    python train.py                                               # the digits demo on CPU (~2 minutes)
    python train.py --preset cifar10-resnet19-t4 --data-dir data  # a README run (--list-presets shows them all)
    python train.py --preset cifar10-resnet19-t4 --resume auto    # continue <out_dir>/<name>/last.pt exactly
    torchrun --nproc_per_node 8 train.py --preset imagenet-resnet18ms-t6 --data-dir /data/imagenet

Every flag overrides one field of the preset (glif2/train/config.py); the loop is glif2/train/loop.py.
"""

from glif2.train.cli import train_main

if __name__ == "__main__":
    train_main()
