"""Store formats: crop reads against whole-volume reads, blosc2 against zarr.

Writes one brain-sized float32 volume (z-scored, like ``prepare`` output) in several
layouts and times: reading the whole volume, reading random 96^3 and 160^3 crops, and
the size on disk. Ratios are what matter; absolute times on a shared machine are noise.

    python benchmarks/bench_store.py [--shape 176 208 176] [--repeat 20]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import save, timeit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def brain_like(shape, seed=0) -> np.ndarray:
    """Smooth anatomy-like structure plus noise, z-scored (what the store really holds)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    vol = gaussian_filter(rng.normal(size=shape).astype(np.float32), 3) * 20
    vol += rng.normal(0, 0.2, shape).astype(np.float32)
    grid = np.indices(shape).astype(np.float32)
    r = np.sqrt(sum(((g - s / 2) / (s / 2.3)) ** 2 for g, s in zip(grid, shape, strict=True)))
    vol[r > 1] = 0
    fg = vol != 0
    vol[fg] = (vol[fg] - vol[fg].mean()) / vol[fg].std()
    return vol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[176, 208, 176])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    import blosc2

    from neurofm.store import write_array

    shape = tuple(args.shape)
    vol = brain_like(shape)
    rng = np.random.default_rng(1)
    tmp = Path(tempfile.mkdtemp(prefix="neurofm-bench-store-"))
    layouts: dict[str, dict] = {}
    try:
        np.save(tmp / "raw.npy", vol)
        layouts["npy (uncompressed, reference)"] = {
            "size": (tmp / "raw.npy").stat().st_size,
            "open": lambda: np.load(tmp / "raw.npy", mmap_mode="r"),
        }
        write_array(tmp / "neurofm.b2nd", vol)
        layouts["blosc2 64^3 chunks / 16^3 blocks (neurofm)"] = {
            "size": (tmp / "neurofm.b2nd").stat().st_size,
            "open": lambda: blosc2.open(str(tmp / "neurofm.b2nd"), mode="r"),
        }
        for chunk in (32, 128):
            p = tmp / f"b{chunk}.b2nd"
            blosc2.asarray(
                vol,
                urlpath=str(p),
                mode="w",
                chunks=(chunk,) * 3,
                blocks=(16,) * 3,
                cparams=blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=1, filters=[blosc2.Filter.SHUFFLE]),
            )
            layouts[f"blosc2 {chunk}^3 chunks / 16^3 blocks"] = {
                "size": p.stat().st_size,
                "open": (lambda p=p: blosc2.open(str(p), mode="r")),
            }
        try:
            import zarr
            from zarr.codecs import BloscCodec

            z = zarr.create_array(
                store=str(tmp / "vol.zarr"),
                shape=shape,
                chunks=(64, 64, 64),
                dtype="float32",
                compressors=[BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
            )
            z[...] = vol
            size = sum(f.stat().st_size for f in (tmp / "vol.zarr").rglob("*") if f.is_file())
            layouts["zarr v3 64^3 chunks, blosc zstd"] = {
                "size": size,
                "open": lambda: zarr.open_array(str(tmp / "vol.zarr"), mode="r"),
            }
        except ImportError:
            print("zarr not installed: skipping it (pip install zarr)")

        rows = []
        for name, lay in layouts.items():
            arr = lay["open"]()
            whole = timeit(lambda arr=arr: np.array(arr[...]), repeat=max(3, args.repeat // 4))
            res = {
                "layout": name,
                "bytes": lay["size"],
                "compression_ratio": vol.nbytes / lay["size"],
                "whole_s": whole["median_s"],
                "open_s": timeit(lay["open"], repeat=5)["median_s"],
            }
            for c in (96, 160):
                starts = [tuple(int(rng.integers(0, s - c + 1)) for s in shape) for _ in range(args.repeat)]
                it = iter(starts * 10)

                def crop(arr=arr, c=c, it=it):
                    x, y, z = next(it)
                    out = np.array(arr[x : x + c, y : y + c, z : z + c])
                    assert out.shape == (c, c, c)

                res[f"crop{c}_s"] = timeit(crop, repeat=args.repeat)["median_s"]
                res[f"crop{c}_vs_whole"] = res[f"crop{c}_s"] / res["whole_s"]
            rows.append(res)
            print(
                f"{name:45s} ratio {res['compression_ratio']:4.2f}x  whole {res['whole_s'] * 1e3:7.1f} ms  "
                f"crop96 {res['crop96_s'] * 1e3:6.1f} ms ({res['crop96_vs_whole']:.2f} of whole)  "
                f"crop160 {res['crop160_s'] * 1e3:6.1f} ms ({res['crop160_vs_whole']:.2f})"
            )
        # Correctness: a crop equals the same slice of the full array, in every layout.
        for lay in layouts.values():
            a = lay["open"]()
            np.testing.assert_array_equal(np.asarray(a[10:50, 20:90, 5:70]), vol[10:50, 20:90, 5:70])
        save("store", {"shape": shape, "voxels": int(np.prod(shape)), "layouts": rows})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
