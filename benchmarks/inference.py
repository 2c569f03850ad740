"""Inference throughput of the default network: convnet against ONNX Runtime, and a Dask cluster
against one process.

* convnet ``model.predict`` and an ONNX Runtime session on the same exported graph, same images,
  same batch size and thread count, timed in interleaved rounds in one process (medians).
* ``convnet.dask.predict`` on a ``distributed.LocalCluster`` of 2 worker processes (1 thread and
  1 BLAS thread each), images already persisted on the workers, against ``model.predict`` in this
  process with 1 and 2 BLAS threads; interleaved rounds, medians.

Usage::

    .venv/bin/python benchmarks/inference.py                    # both parts
    .venv/bin/python benchmarks/inference.py --images 4000 --rounds 9 --no-dask

On a 2-core machine a 2-worker cluster can at best match one process that already uses both
cores through BLAS: the cluster's value is adding machines, which this measures the overhead of.
The load average is printed first: other work on the machine slows every figure.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import numpy as np

import convnet
from convnet.model import Sequential


def _median_rate(times: list[float], images: int) -> float:
    return images / statistics.median(times)


def _blas(threads: int):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def onnx_runtime_vs_convnet(model: Sequential, x: np.ndarray, batch: int, rounds: int,
                            threads: list[int]) -> list[str]:
    import onnxruntime as ort

    import convnet.onnx as cx

    data = cx.to_onnx(model).SerializeToString()
    lines = []
    for t in threads:
        options = ort.SessionOptions()
        options.intra_op_num_threads = t
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

        def run_ort(session=session):
            return np.concatenate([session.run(None, {"input": x[i:i + batch]})[0]
                                   for i in range(0, len(x), batch)])

        def run_convnet():
            return model.predict(x, batch_size=batch)

        with _blas(t):
            err = float(np.abs(run_ort() - run_convnet()).max())  # also the warm-up
            times: dict[str, list[float]] = {"convnet": [], "ort": []}
            for _ in range(rounds):
                for name, fn in (("convnet", run_convnet), ("ort", run_ort)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        ours, theirs = _median_rate(times["convnet"], len(x)), _median_rate(times["ort"], len(x))
        lines.append(f"{t} thread{'s' if t > 1 else ' '}: convnet {ours:9,.0f} img/s   ONNX Runtime {theirs:9,.0f} "
                     f"img/s   convnet/ORT {ours / theirs:.2f}x   (max |diff| {err:.1e})")
    return lines


def dask_vs_one_process(model: Sequential, x: np.ndarray, batch: int, rounds: int) -> list[str]:
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    import convnet.dask as cd

    one_thread = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR, env=one_thread) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        start = time.perf_counter() - t0
        images = client.persist(da.from_array(x, chunks=(batch, *x.shape[1:])))
        wait(images)

        def run_cluster():
            return cd.predict(model, images, batch_size=batch, output="labels").compute()

        def run_local(threads):
            def run():
                with _blas(threads):
                    return model.predict(x, batch_size=batch).argmax(axis=1)
            return run

        assert np.array_equal(run_cluster(), run_local(2)())  # also the warm-up
        times: dict[str, list[float]] = {"cluster": [], "1": [], "2": []}
        for _ in range(rounds):
            for name, fn in (("1", run_local(1)), ("2", run_local(2)), ("cluster", run_cluster)):
                t1 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t1)
    rates = {k: _median_rate(v, len(x)) for k, v in times.items()}
    return [f"one process, 1 BLAS thread : {rates['1']:9,.0f} img/s",
            f"one process, 2 BLAS threads: {rates['2']:9,.0f} img/s",
            f"Dask LocalCluster, 2 workers x 1 thread: {rates['cluster']:9,.0f} img/s "
            f"({rates['cluster'] / rates['2']:.2f}x the 2-thread process; cluster started in {start:.1f} s; "
            f"every round ships the model once per worker)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    model = convnet.lenet()
    x = np.random.default_rng(0).random((args.images, 1, 28, 28), dtype=np.float32)
    print(f"default network (lenet, {model.num_parameters():,} parameters), {args.images} images of 1x28x28, "
          f"batch {args.batch_size}, median of {args.rounds} interleaved rounds; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    if not args.no_onnx:
        print("\nconvnet vs ONNX Runtime (same graph, same threads):")
        for line in onnx_runtime_vs_convnet(model, x, args.batch_size, args.rounds, args.threads):
            print("  " + line)
    if not args.no_dask:
        print("\nDask cluster vs one process:")
        for line in dask_vs_one_process(model, x, args.batch_size, args.rounds):
            print("  " + line)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (other work on the machine slows every figure)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
