"""Latency of `convnet serve`'s prediction request (probabilities, feature maps and saliency).

Starts the server on a free loopback port with the default network (or MODEL), then times
POST /api/predict round trips from this process, one request at a time: median and 90th
percentile over --repeat requests on test digits, idle and while the page's background
training runs. The in-process cost of the same work (Inference.predict, no HTTP, no JSON) is
timed alongside, interleaved, so the two figures share the machine's state.

    python benchmarks/serve_latency.py [MODEL] [--repeat 200]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time

import numpy as np

import convnet
from convnet import serve
from convnet.datasets import load_mnist_5k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model file (default: an untrained default network; "
                                                               "the cost does not depend on the weights)")
    parser.add_argument("--repeat", type=int, default=200, help="requests per setting (default 200)")
    args = parser.parse_args(argv)

    model = convnet.load(args.model) if args.model else convnet.lenet(rng=0)
    x_test = load_mnist_5k().x_test
    server = serve.make_server(model, "127.0.0.1", 0, model_name=args.model or "lenet (untrained)")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    bodies = [json.dumps({"pixels": [float(v) for v in x_test[i].ravel()]}).encode() for i in range(50)]

    def http_once(i: int) -> tuple[float, int]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t0 = time.perf_counter()
        conn.request("POST", "/api/predict", body=bodies[i % len(bodies)],
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - t0
        conn.close()
        assert response.status == 200, data[:200]
        return elapsed, len(data)

    def direct_once(i: int) -> float:
        x = x_test[i % len(bodies)][None]
        t0 = time.perf_counter()
        server.inference.predict(x)
        return time.perf_counter() - t0

    def measure(label: str) -> None:
        for i in range(10):  # warm up
            http_once(i)
            direct_once(i)
        http_times, direct_times, sizes = [], [], []
        for i in range(args.repeat):
            t, n = http_once(i)
            http_times.append(t)
            sizes.append(n)
            direct_times.append(direct_once(i))

        def ms(values, q):
            return 1000 * float(np.percentile(values, q))

        print(f"{label:<28} request median {ms(http_times, 50):6.1f} ms (p90 {ms(http_times, 90):6.1f}); "
              f"in-process median {ms(direct_times, 50):6.1f} ms (p90 {ms(direct_times, 90):6.1f}); "
              f"answer {statistics.median(sizes) / 1024:.0f} KiB", flush=True)

    print(f"convnet serve latency: {server.model_name}, {model.num_parameters():,} parameters; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; {args.repeat} requests each")
    try:
        measure("idle")
        server.trainer.start(50, 1e-3)
        while server.trainer.state()["batch"] == 0:
            time.sleep(0.05)
        measure("while training runs")
        server.trainer.stop(wait=60)
    finally:
        server.shutdown()
        server.close()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
