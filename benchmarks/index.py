"""Nearest-neighbour search at MSCOCO scale: our index path against raw ScaNN, faiss and numpy.

118,287 x 768 unit vectors in overlapping clusters (variant B of ../shared/reference/baselines.md §4),
1,000 queries drawn the same way, k = 10, inner product. Every method runs in this one process, on
the same data, so the ratios are like for like. For each recall target (0.95, 0.99) the fastest
setting that reaches it is reported (sweeps as in baselines.md). Batched QPS = 1000 / median of 3
passes over all queries; single-query latency = p50 / p95 over 200 one-query calls.

  .venv/bin/pip install faiss-cpu==1.13.2      # benchmark-only (the `bench` extra)
  .venv/bin/python benchmarks/index.py [--rows 118287] [--out benchmarks/results_index_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine as this_machine  # noqa: E402

this_machine.prepare()  # --isa AVX2 holds numpy (and XLA) to AVX2; ScaNN picks its kernels itself
import numpy as np  # noqa: E402

K = 10
TARGETS = (0.95, 0.99)


def variant_b(rows: int, dim: int = 768, clusters: int = 2000, queries: int = 1000):
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  supers = unit(rng.standard_normal((50, dim), dtype=np.float32))
  centres = unit(supers[rng.integers(0, 50, clusters)] + unit(rng.standard_normal((clusters, dim), dtype=np.float32)))
  radius = rng.uniform(0.5, 2.0, clusters).astype(np.float32)

  def draw(n, r):
    a = r.integers(0, clusters, n)
    return unit(centres[a] + (radius[a] / np.sqrt(dim))[:, None] * r.standard_normal((n, dim), dtype=np.float32))
  return draw(rows, rng).astype(np.float32), draw(queries, np.random.default_rng(1)).astype(np.float32)


def recall(found, truth) -> float:
  return float(np.mean([len(np.intersect1d(f[:K], t)) / K for f, t in zip(np.asarray(found), truth)]))


def timed(search, queries, repeats=3) -> tuple[float, np.ndarray]:
  times, found = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    found = search(queries)
    times.append(time.perf_counter() - start)
  return len(queries) / float(np.median(times)), found


def latency(search_one, queries, count=200) -> dict:
  for q in queries[:5]:
    search_one(q)
  times = []
  for q in queries[:count]:
    start = time.perf_counter()
    search_one(q)
    times.append((time.perf_counter() - start) * 1e3)
  return {'p50_ms': float(np.percentile(times, 50)), 'p95_ms': float(np.percentile(times, 95))}


def sweep(name, settings, make_search, make_one, queries, truth, build_s):
  """The fastest setting reaching each recall target."""
  measured = []
  for setting in settings:
    qps, found = timed(make_search(setting), queries)
    measured.append({'setting': setting, 'qps': qps, 'recall': recall(found, truth)})
    print(f'  {name:<22} {str(setting):<18} recall {measured[-1]["recall"]:.4f}  {qps:>9,.0f} QPS', flush=True)
  best = {}
  for target in TARGETS:
    reaching = [m for m in measured if m['recall'] >= target]
    if reaching:
      top = max(reaching, key=lambda m: m['qps'])
      best[str(target)] = dict(top, **latency(make_one(top['setting']), queries))
  return {'build_s': build_s, 'best': best, 'sweep': measured}


def machine() -> dict:
  return dict(this_machine.describe(), python=platform.python_version())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rows', type=int, default=118_287)
  parser.add_argument('--out', default=str(Path(__file__).with_name('results_index_cpu.json')))
  parser.add_argument('--skip-faiss', action='store_true')
  this_machine.add_isa_argument(parser)
  args = parser.parse_args()
  import scann
  from attrib.index import Index, IndexConfig
  data, queries = variant_b(args.rows)
  scores = queries @ data.T
  top = np.argpartition(-scores, K, axis=1)[:, :K]
  truth = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1), 1)
  results = {'rows': args.rows, 'dim': 768, 'queries': len(queries), 'k': K, 'machine': machine()}
  print(f'{args.rows} x 768, {len(queries)} queries, k={K}; {results["machine"]}', flush=True)

  qps, _ = timed(lambda q: np.argpartition(-(q @ data.T), K, axis=1)[:, :K], queries, repeats=3)
  results['numpy_exact'] = {'qps': qps, 'recall': 1.0}
  print(f'  numpy exact            {qps:,.0f} QPS', flush=True)

  leaves = int(round(np.sqrt(args.rows)))
  grid = [(l, r) for l in (4, 8, 16, 32, 64) for r in (50, 100, 200)]
  start = time.perf_counter()
  raw = (scann.scann_ops_pybind.builder(data, K, 'dot_product')
         .tree(num_leaves=leaves, num_leaves_to_search=32, training_sample_size=args.rows)
         .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(100).build())
  raw_build = time.perf_counter() - start
  results['scann_raw'] = sweep(
      'ScaNN (raw)', grid,
      lambda s: (lambda q: raw.search_batched_parallel(q, K, s[1], s[0])[0]),
      lambda s: (lambda q: raw.search(q, K, s[1], s[0])), queries, truth, raw_build)

  start = time.perf_counter()
  ours = Index.build(data, None, IndexConfig(kind='tree_ah', num_leaves=leaves, leaves_to_search=32, reorder=100,
                                             recall_probes=200))
  ours_build = time.perf_counter() - start
  results['ours_index'] = sweep(
      'ours (Index.search)', grid,
      lambda s: (lambda q: ours.search(q, K, leaves=s[0], reorder=s[1])[0]),
      lambda s: (lambda q: ours.search(q, K, leaves=s[0], reorder=s[1])), queries, truth, ours_build)
  results['ours_index']['recall_measured_at_build'] = ours.meta[f'recall_at_{K}']

  if not args.skip_faiss:
    import faiss
    faiss.omp_set_num_threads(os.cpu_count())
    start = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(768), 768, leaves, faiss.METRIC_INNER_PRODUCT)
    ivf.train(data)
    ivf.add(data)
    ivf_build = time.perf_counter() - start

    def ivf_search(nprobe):
      def run(q):
        ivf.nprobe = nprobe
        return ivf.search(np.atleast_2d(q), K)[1]
      return run
    results['faiss_ivf_flat'] = sweep('faiss IVFFlat', [1, 2, 4, 8, 16], ivf_search, ivf_search, queries, truth, ivf_build)
    start = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(768, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(data)
    hnsw_build = time.perf_counter() - start

    def hnsw_search(ef):
      def run(q):
        hnsw.hnsw.efSearch = ef
        return hnsw.search(np.atleast_2d(q), K)[1]
      return run
    results['faiss_hnsw'] = sweep('faiss HNSW M32', [32, 64, 128, 256, 512], hnsw_search, hnsw_search, queries,
                                  truth, hnsw_build)

  summary = {}
  for target in map(str, TARGETS):
    raw_best = results['scann_raw']['best'].get(target)
    ours_best = results['ours_index']['best'].get(target)
    faiss_best = max((results[m]['best'][target]['qps'] for m in ('faiss_ivf_flat', 'faiss_hnsw')
                      if m in results and target in results[m]['best']), default=None)
    summary[target] = {
        'ours_qps': ours_best and ours_best['qps'], 'raw_scann_qps': raw_best and raw_best['qps'],
        'ours_over_raw_scann': ours_best and raw_best and ours_best['qps'] / raw_best['qps'],
        'best_faiss_qps': faiss_best, 'ours_over_best_faiss': faiss_best and ours_best and ours_best['qps'] / faiss_best,
        'numpy_qps': results['numpy_exact']['qps']}
  results['summary'] = summary
  print(json.dumps(summary, indent=1))
  Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
  main()
