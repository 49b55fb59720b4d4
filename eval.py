"""Evaluate checkpoints: top-1, top-5, loss, mean firing rate per GLIF layer, images/s (also `glif2-eval`).

    python eval.py --checkpoint runs/digits/best.pt
    python eval.py --checkpoint "trained models/resCifar19-CIFAR10-step4-CW.pth.tar" --data-dir data
    python eval.py --checkpoint "trained models/" --dataset cifar100 --json results.json   # a folder: one row each

Our checkpoints and the paper's released files are told apart automatically (glif2.load_model); the model is
rebuilt from the file alone. The dataset defaults to the one the checkpoint names (its train config or the released
file's table entry), else to a guess from its input and class count. The first batch (kernel compilation) is left
out of images/s. The code is glif2/train/evaluation.py.
"""

from glif2.train.cli import eval_main

if __name__ == "__main__":
    eval_main()
