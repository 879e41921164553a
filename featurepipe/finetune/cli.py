"""``python -m featurepipe.finetune`` / ``featurepipe finetune``."""

from ..backbones import PREPROCESS
from ..cli import OneLineParser
from .train import finetune


def build_parser():
    p = OneLineParser(
        prog="python -m featurepipe.finetune",
        description="Fine-tune a backbone on the split of its feature file (new head on cached "
                    "features, then the top layers) and save models/<dataset>/<backbone>__finetune.keras/.json.")
    p.add_argument("--data", help="the image folder (or CSV) the features were extracted from")
    p.add_argument("--backbone", default="mobilenet_v2", help="backbone name or file:PATH (default mobilenet_v2)")
    p.add_argument("--features", help="feature file to use (default data/features/<name of DATA>/<backbone>.h5)")
    p.add_argument("--unfreeze", help="top N layers, a layer name (or prefix) to unfreeze from, or all "
                                      "(default per backbone, e.g. block_16 for mobilenet_v2)")
    p.add_argument("--epochs", type=int, default=6, help="maximum fine-tuning epochs (default 6; 0: head only)")
    p.add_argument("--head-epochs", type=int, default=40, help="maximum head epochs on cached features")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning SGD learning rate (momentum 0.9)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="head Adam learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--patience", type=int, default=2, help="epochs without a lower val loss before stopping")
    p.add_argument("--val-size", type=float, default=0.1, help="val fraction of train rows when the file has no val rows")
    p.add_argument("--no-augment", action="store_true", help="no flip/rotation/zoom while fine-tuning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", help="the backbone's weights file (default: found as for extract)")
    p.add_argument("--models", help="models root (default $FEATUREPIPE_MODELS or models)")
    p.add_argument("--extract", action="store_true", help="extract the features first when missing")
    p.add_argument("--preprocess", choices=sorted(PREPROCESS), help="preprocessing for file: backbones (with --extract)")
    p.add_argument("--restart", action="store_true", help="discard the checkpoints of an earlier run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    finetune(args.data, args.backbone, features=args.features, unfreeze=args.unfreeze,
             epochs=args.epochs, head_epochs=args.head_epochs, lr=args.lr, head_lr=args.head_lr,
             batch_size=args.batch_size, dropout=args.dropout, patience=args.patience,
             val_size=args.val_size, augment=not args.no_augment, seed=args.seed,
             weights=args.weights, models_dir=args.models, extract_missing=args.extract,
             preprocess=args.preprocess, restart=args.restart, quiet=args.quiet)
    return 0
