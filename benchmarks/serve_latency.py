"""What `attrib serve` adds to a query: `attribute()` called in the process against the same query
POSTed to the server over one kept-open HTTP connection (image bytes in the body, prompt in the URL),
and queries per second from several clients at once against one client, in the same run.

A digits workdir (the quickstart's by default) and its test queries as PNG files. Reported per
`--repeats` round: p50 / p95 of `--queries` sequential calls each way, their difference (what HTTP,
JSON and decoding the body cost), and the throughput of `--clients` threads each on its own connection.
With openssl on the PATH, the same sequential queries also go to a second server that serves HTTPS
(a self-signed certificate made for the run) and asks for a bearer token: what TLS and the token
check add on a kept-open connection.

  .venv/bin/python benchmarks/serve_latency.py [--workdir runs/quickstart/attrib] [--queries 100] [--out FILE]
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine as this_machine  # noqa: E402

this_machine.prepare(device_count=1)
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def query_files(workdir: Path) -> list[tuple[bytes, str]]:
  """The teacher's test queries as PNG bytes with their prompts."""
  from PIL import Image
  queries = np.load(workdir / 'teacher' / 'queries.npz')
  files = []
  for image, prompt in zip(queries['images'], queries['prompts']):
    buffer = io.BytesIO()
    Image.fromarray(((image[..., 0] + 1) * 127.5).round().astype(np.uint8)).save(buffer, format='PNG')
    files.append((buffer.getvalue(), str(prompt)))
  return files


def timed(call, count: int) -> np.ndarray:
  times = []
  for i in range(count):
    started = time.perf_counter()
    call(i)
    times.append((time.perf_counter() - started) * 1e3)
  return np.asarray(times)


def tls_server(attributor, folder: Path):
  """A second server on the same attributor, HTTPS with a token; (server, client TLS context)."""
  from attrib.serve import AttributionServer, tls_context
  subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=127.0.0.1',
                  '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', str(folder / 'key.pem'), '-out',
                  str(folder / 'cert.pem')], check=True, capture_output=True)
  server = AttributionServer(attributor, '127.0.0.1', 0, TOKEN,
                             tls_context(str(folder / 'cert.pem'), str(folder / 'key.pem')))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, ssl.create_default_context(cafile=str(folder / 'cert.pem'))


TOKEN = 'benchmark-token'


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default=str(ROOT / 'runs/quickstart/attrib'))
  parser.add_argument('--queries', type=int, default=100)
  parser.add_argument('--clients', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--k', type=int, default=10)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/results_serve_latency_cpu.json'))
  args = parser.parse_args()
  from PIL import Image
  from attrib.attributor import Attributor
  from attrib.serve import AttributionServer, warm_up
  workdir = Path(args.workdir)
  files = query_files(workdir)
  this_machine.say(this_machine.describe())
  attributor = Attributor.load(workdir)
  warm_up(attributor)
  server = AttributionServer(attributor, '127.0.0.1', 0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  host, port = server.server_address[:2]

  def in_process(i):
    data, prompt = files[i % len(files)]
    attributor.attribute(image=Image.open(io.BytesIO(data)), prompt=prompt, k=args.k)

  folder = Path(tempfile.mkdtemp())
  secure, trusted = tls_server(attributor, folder) if shutil.which('openssl') else (None, None)

  def client(tls: bool = False):
    if tls:
      connection = http.client.HTTPSConnection(*secure.server_address[:2], context=trusted)
      headers = {'Content-Type': 'image/png', 'Authorization': f'Bearer {TOKEN}'}
    else:
      connection = http.client.HTTPConnection(host, port)
      headers = {'Content-Type': 'image/png'}

    def over_http(i):
      data, prompt = files[i % len(files)]
      connection.request('POST', '/attribute?' + urllib.parse.urlencode({'prompt': prompt, 'k': args.k}), body=data,
                         headers=headers)
      response = connection.getresponse()
      body = response.read()
      assert response.status == 200, body
    return over_http

  rounds = []
  for repeat in range(args.repeats):
    direct = timed(in_process, args.queries)
    http_one = timed(client(), args.queries)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
      list(pool.map(lambda c: timed(client(), args.queries), range(args.clients)))
    many_qps = args.clients * args.queries / (time.perf_counter() - started)
    one_qps = args.queries / (http_one.sum() / 1e3)
    rounds.append({'attribute_p50_ms': float(np.median(direct)), 'attribute_p95_ms': float(np.percentile(direct, 95)),
                   'http_p50_ms': float(np.median(http_one)), 'http_p95_ms': float(np.percentile(http_one, 95)),
                   'http_adds_p50_ms': float(np.median(http_one) - np.median(direct)),
                   'one_client_qps': one_qps, f'{args.clients}_clients_qps': many_qps})
    if secure is not None:
      https_one = timed(client(tls=True), args.queries)
      rounds[-1].update({'https_token_p50_ms': float(np.median(https_one)),
                         'https_token_adds_p50_ms': float(np.median(https_one) - np.median(http_one))})
    print(json.dumps({'round': repeat, **{k: round(v, 2) for k, v in rounds[-1].items()}}), flush=True)
  server.shutdown()
  if secure is not None:
    secure.shutdown()
  shutil.rmtree(folder)
  summary = {key: {'median': float(np.median([r[key] for r in rounds])),
                   'range': [float(min(r[key] for r in rounds)), float(max(r[key] for r in rounds))]}
             for key in rounds[0]}
  result = {'benchmark': 'serve_latency', 'machine': this_machine.describe(), 'workdir': str(workdir),
            'queries': args.queries, 'clients': args.clients, 'k': args.k, 'rounds': rounds, 'summary': summary}
  Path(args.out).write_text(json.dumps(result, indent=1))
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  main()
