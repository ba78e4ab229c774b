"""`launch.py attrib serve`: a distilled student behind HTTP, for an application that asks "which
training images made this image?" over the network. The Attributor loads once (index and embedder
in memory, compiled by a warm-up query before the first request) and answers each request as
`Attributor.attribute` answers it, many at once: one thread per connection, queries sharing the
index under its readers' lock.

  POST /attribute   one query
      the image file's bytes as the body, its prompt and options in the URL:
        curl --data-binary @q.png 'http://127.0.0.1:8000/attribute?prompt=a+handwritten+seven&k=10&among=5,77'
      or JSON (Content-Type: application/json):
        {"image": "<the file's bytes, base64>", "prompt": "...", "k": 10, "among": [5, 77]}
        {"features": [...], "k": 10}       (a student of precomputed features: one φ row)
      -> 200 {"ids": [...], "scores": [...], "captions": [...] or null, "paths": [...] or null, "ms": 4.2}
  GET /health       -> 200 {"status": "ok", "training_images": N, "attributor": "Attributor(...)"}
                       (HEAD /health: the same status and headers, no body)
  Another method than an endpoint's gets 405 with its Allow header; a path that is none, 404.

A request the student cannot take (not an image, no prompt, k out of range, an unknown field or
training id) gets 400 with {"error": "..."} naming what was wrong, as the CLI's one-line errors; a
fault of ours gets 500 with its message (and its traceback on stderr); the server goes on either way.
The student's files are watched (`--reload-every`, 2 s): after `attrib add`, `attrib remove` (a
takedown) or `attrib index` from a shell, the server loads the changed student beside the one
answering and then answers with it, without a restart or a refused request. It writes nothing into the
workdir and holds no lock on it. SIGTERM or Ctrl-C stop it, printing how many requests it answered and
their latency.

Open to a network: it listens on 127.0.0.1 unless --host says otherwise. `--token-file FILE` (or the
ATTRIB_SERVE_TOKEN variable) makes /attribute ask for `Authorization: Bearer <the file's first line>`
(401 without it; /health then answers {"status": "ok"} alone to a request without it, for a load
balancer's probe); `--tls-cert CERT --tls-key KEY` (PEM) serves HTTPS, each connection's handshake in
its own thread. A proxy in front (with its own TLS and auth) works as well.
"""
from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hmac
import json
import os
import signal
import ssl
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np

from core.errors import UserError

# Larger bodies are refused unread: a generated image is a few MB at most, and each request's body
# is held in memory while it is answered.
MAX_BODY_BYTES = 32 << 20
LATENCIES_KEPT = 10_000  # p50 / p95 in /health and the final counts are of the latest answers
_ENDPOINTS = {'/attribute': 'POST', '/health': 'GET', '/': 'GET'}  # the method each takes
USAGE = 'POST /attribute, GET /health'
_URL_FIELDS = {'prompt', 'k', 'among'}
_JSON_FIELDS = {'image', 'prompt', 'k', 'among', 'features'}


class BadRequest(UserError):
  """A request the server cannot take, answered with its HTTP status and this message."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def query_of_url(params: dict[str, list[str]], body: bytes) -> dict:
  """Attributor.attribute's arguments from a request whose body is the image file and whose URL holds
  prompt=, k= and among=3,17,250."""
  from attrib.query_images import decode_image
  unknown = sorted(set(params) - _URL_FIELDS)
  if unknown:  # a misspelt option would otherwise be answered with its default
    raise BadRequest(f'unknown URL parameter(s) {", ".join(unknown)}: this endpoint takes '
                     f'{", ".join(sorted(_URL_FIELDS))}')
  repeated = sorted(name for name, values in params.items() if len(values) > 1)
  if repeated:
    raise BadRequest(f'URL parameter(s) {", ".join(repeated)} given more than once')
  query = {name: values[0] for name, values in params.items()}
  if not body:
    raise BadRequest('the request has no body: send the image file\'s bytes (curl --data-binary @q.png), '
                     'or JSON with "image" (base64) and "prompt"')
  if 'prompt' not in query:
    raise BadRequest('no prompt= in the URL: the prompt that generated the image (URL-encoded)')
  kwargs = {'image': decode_image(body, 'the request body'), 'prompt': query['prompt']}
  if 'k' in query:
    kwargs['k'] = _integer(query['k'], 'k')
  if 'among' in query:
    kwargs['among'] = [_integer(text, 'among') for text in query['among'].split(',') if text.strip()]
  return kwargs


def query_of_json(body: bytes) -> dict:
  """Attributor.attribute's arguments from a JSON request: image (base64) and prompt, or features."""
  from attrib.query_images import decode_image
  try:
    fields = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BadRequest(f'the request body is not JSON ({e})') from None
  if not isinstance(fields, dict):
    raise BadRequest(f'the JSON body is a {type(fields).__name__}, expected an object: '
                     '{"image": base64, "prompt": "...", "k": 10}')
  unknown = sorted(set(fields) - _JSON_FIELDS)
  if unknown:
    raise BadRequest(f'unknown field(s) {", ".join(unknown)}: a request takes {", ".join(sorted(_JSON_FIELDS))}')
  kwargs = {name: fields[name] for name in ('prompt', 'k', 'among') if name in fields}
  if 'features' in fields:
    if 'image' in fields or 'prompt' in fields:
      raise BadRequest('give "image" and "prompt", or "features", not both')
    try:
      kwargs['features'] = np.asarray(fields['features'], np.float32)
    except (TypeError, ValueError) as e:
      raise BadRequest(f'"features" is not a list of numbers ({e})') from None
    return kwargs
  if 'image' not in fields:
    raise BadRequest('no "image": the image file\'s bytes, base64-encoded (or "features" for a student of '
                     'precomputed features)')
  if not isinstance(fields['image'], str):
    raise BadRequest(f'"image" is a {type(fields["image"]).__name__}, expected a base64 string')
  try:
    data = base64.b64decode(fields['image'], validate=True)
  except (binascii.Error, ValueError) as e:
    raise BadRequest(f'"image" is not base64 ({e})') from None
  if 'prompt' not in fields:
    raise BadRequest('no "prompt": the prompt that generated the image')
  kwargs['image'] = decode_image(data, '"image"')
  return kwargs


def _integer(text: str, name: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise BadRequest(f'{name}={text!r} is not an integer') from None


def answer_json(attribution, ms: float) -> dict:
  return {'ids': attribution.ids.tolist(), 'scores': attribution.scores.tolist(), 'captions': attribution.captions,
          'paths': attribution.paths, 'ms': round(ms, 3)}


class _Handler(BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'  # connections kept open: a client's next query skips the handshake
  # Headers and body leave as separate writes; with Nagle's algorithm the body then waited for the
  # client's delayed ACK: 40 ms more per answer on a kept-open connection (46 against 6 ms measured).
  disable_nagle_algorithm = True
  # A connection silent this long is closed: an idle kept-open one, or a client that stopped sending
  # mid-request, would otherwise hold its thread forever.
  timeout = 60
  server_version = 'lvm-attrib'
  server: 'AttributionServer'

  def setup(self):
    super().setup()
    if isinstance(self.connection, ssl.SSLSocket):  # here, in this connection's thread, under its timeout
      self.connection.do_handshake()

  def _authorized(self) -> bool:
    """Whether the request carries the server's token (always, when it has none)."""
    if self.server.token is None:
      return True
    scheme, _, given = self.headers.get('Authorization', '').partition(' ')
    return scheme.lower() == 'bearer' and hmac.compare_digest(given.strip().encode(), self.server.token.encode())

  def do_GET(self):
    if self._routed('GET'):
      if not self._authorized():  # a load balancer's probe: alive, and nothing about the student
        self._reply(200, {'status': 'ok'})
        return
      attributor = self.server.attributor
      self._reply(200, {'status': 'ok', 'training_images': len(attributor.index) - len(attributor.removed),
                        'attributor': repr(attributor), 'requests': self.server.counts()})

  def do_HEAD(self):  # a GET's status and headers without its body (a load balancer's health check)
    self.do_GET()

  def _refuse(self):  # no endpoint takes these methods: 405 with what they take, as JSON
    self._routed(self.command)

  do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

  def _routed(self, method: str) -> bool:
    """Whether the URL's endpoint takes `method`; if not, the request is answered here: 404 for an
    endpoint that does not exist, 405 (with an Allow header) for one that takes another method."""
    path = urlsplit(self.path).path
    takes = _ENDPOINTS.get(path)
    if takes == method:
      return True
    self._body_left_unread()
    if takes is None:
      self._reply(404, {'error': f'no such endpoint {path!r}: {USAGE}'})
    else:
      self._reply(405, {'error': f'{path} takes {takes}, not {self.command}: {USAGE}'}, allow=takes)
    return False

  def _body_left_unread(self) -> None:
    if self.headers.get('Content-Length', '0').strip() != '0' or 'Transfer-Encoding' in self.headers:
      self.close_connection = True  # its body is not read: the connection cannot carry another request

  def do_POST(self):
    if not self._routed('POST'):
      return
    if not self._authorized():
      self._body_left_unread()
      self._reply(401, {'error': 'this server asks for its token: an Authorization: Bearer <token> header'},
                  authenticate=True)
      return
    url = urlsplit(self.path)
    started = time.perf_counter()
    attributor = self.server.attributor  # one student for the whole request, whatever a reload does meanwhile
    try:
      body = self._body()
      content_type = self.headers.get('Content-Type', '').split(';')[0].strip().lower()
      if content_type == 'application/json':
        if url.query:
          raise BadRequest('a JSON request carries its options in the body, not the URL')
        kwargs = query_of_json(body)
      else:
        kwargs = query_of_url(parse_qs(url.query, keep_blank_values=True), body)
      with self.server.computing():
        attribution = attributor.attribute(**kwargs)
    except UserError as e:  # bad input: what was wrong, by name
      self._reply(getattr(e, 'status', 400), {'error': str(e)})
      return
    except Exception as e:  # noqa: BLE001 (a fault of ours: said, logged, and the server goes on)
      traceback.print_exc(file=sys.stderr)
      self._reply(500, {'error': f'internal error: {type(e).__name__}: {e}'})
      return
    ms = (time.perf_counter() - started) * 1e3
    self.server.answered(ms)
    self._reply(200, answer_json(attribution, ms))

  def _body(self) -> bytes:
    length = self.headers.get('Content-Length')
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked' or length is None:
      self.close_connection = True  # a body of unknown length cannot be skipped to the next request
      raise BadRequest('the request needs a Content-Length (a chunked body is not read)', 411)
    try:
      length = int(length)
      if length < 0:  # read(-1) would read until the client closes
        raise ValueError
    except ValueError:
      self.close_connection = True
      raise BadRequest(f'Content-Length {self.headers.get("Content-Length")!r} is not a byte count') from None
    if length > MAX_BODY_BYTES:
      self.close_connection = True  # refused unread
      raise BadRequest(f'the body is {length:,} bytes, over the {MAX_BODY_BYTES:,} this server reads', 413)
    try:
      body = self.rfile.read(length)
    except TimeoutError:
      self.close_connection = True
      raise BadRequest(f'the body stopped arriving: {length:,} bytes announced, none more in {self.timeout} s',
                       408) from None
    if len(body) < length:  # the client closed its side early
      self.close_connection = True
      raise BadRequest(f'the body ended after {len(body):,} of the {length:,} bytes its Content-Length announced')
    return body

  def _reply(self, status: int, payload: dict, allow: str | None = None, authenticate: bool = False) -> None:
    if status != 200:
      self.server.count_error(status)
    data = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(data)))
    if allow:
      self.send_header('Allow', allow)
    if authenticate:
      self.send_header('WWW-Authenticate', 'Bearer')
    if self.close_connection:  # the client learns not to send its next request on this connection
      self.send_header('Connection', 'close')
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(data)

  def log_message(self, format, *args):  # one line per request on stderr, as http.server's, with the time
    sys.stderr.write(f'{time.strftime("%Y-%m-%d %H:%M:%S")} {self.address_string()} {format % args}\n')


class AttributionServer(ThreadingHTTPServer):
  """An HTTP server answering attribution queries with one Attributor (see the module docstring)."""
  daemon_threads = True  # a client holding its connection open does not keep the server from stopping

  def __init__(self, attributor, host: str = '127.0.0.1', port: int = 8000, token: str | None = None,
               tls: ssl.SSLContext | None = None):
    self.attributor = attributor  # replaced whole by reload_when_changed: a request reads it once
    self.token, self.tls = token, tls
    self.reloads = 0
    self._lock, self._answered, self._refused, self._failed = threading.Lock(), 0, 0, 0
    self._in_flight, self._stopping = 0, False
    self._none_in_flight = threading.Condition(self._lock)
    # The latest answers' latencies, for p50/p95: a service's whole history would grow without bound.
    self._latencies_ms = collections.deque(maxlen=LATENCIES_KEPT)
    super().__init__((host, port), _Handler)
    if tls is not None:  # accepted connections come wrapped; each handshakes in its handler's thread
      self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f'{"https" if self.tls else "http"}://{host}:{port}'

  @contextlib.contextmanager
  def computing(self):
    """Around a request's attribution: counted in flight, refused (503) once the server is stopping."""
    with self._lock:
      if self._stopping:
        raise BadRequest('the server is stopping', 503)
      self._in_flight += 1
    try:
      yield
    finally:
      with self._lock:
        self._in_flight -= 1
        self._none_in_flight.notify_all()

  def stop_answering(self, timeout_s: float = 60) -> None:
    """Refuses new attributions and waits for those in flight. A request thread is a daemon (a client
    holding its connection open must not keep the process alive), and one still in the student's
    jitted code when the interpreter exits aborts the process ('FATAL: exception not rethrown')."""
    with self._lock:
      self._stopping = True
      self._none_in_flight.wait_for(lambda: self._in_flight == 0, timeout_s)

  def answered(self, ms: float) -> None:
    with self._lock:
      self._answered += 1
      self._latencies_ms.append(ms)

  def count_error(self, status: int) -> None:
    with self._lock:
      if status >= 500:
        self._failed += 1  # ours
      else:
        self._refused += 1  # the request's

  def counts(self) -> dict:
    with self._lock:
      latencies = np.asarray(self._latencies_ms)
      return {'answered': self._answered, 'refused': self._refused, 'failed': self._failed,
              **({'p50_ms': round(float(np.percentile(latencies, 50)), 3),
                  'p95_ms': round(float(np.percentile(latencies, 95)), 3)} if len(latencies) else {})}

  def handle_error(self, request, client_address):
    # Not the server's fault: a client gone mid-reply, one that spoke plain HTTP (or nothing) to HTTPS.
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError)):
      super().handle_error(request, client_address)


def read_token(token_file: str | None) -> str | None:
  """The bearer token: the first line of `token_file`, else $ATTRIB_SERVE_TOKEN, else None (no auth).
  A file, not a flag: a flag's value shows in every user's `ps`."""
  from core.config import ConfigError
  if token_file is None:
    token = os.environ.get('ATTRIB_SERVE_TOKEN')
    where = 'ATTRIB_SERVE_TOKEN'
  else:
    try:
      with open(token_file, encoding='utf-8') as f:
        token = f.readline()
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f'--token-file {token_file}: cannot be read ({e})') from None
    where = f'--token-file {token_file}'
  if token is None:
    return None
  if not token.strip():
    raise ConfigError(f'{where}: the token is empty')
  return token.strip()


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
  """A server TLS context from PEM files, checked before the student loads; None for plain HTTP."""
  from core.config import ConfigError
  if (cert is None) != (key is None):
    raise ConfigError('--tls-cert and --tls-key go together (the certificate chain and its private key, PEM)')
  if cert is None:
    return None
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  try:
    context.load_cert_chain(cert, key)
  except FileNotFoundError as e:
    raise ConfigError(f'{e.filename or cert}: no such file (--tls-cert {cert} --tls-key {key})') from None
  except (ssl.SSLError, OSError) as e:
    raise ConfigError(f'--tls-cert {cert} --tls-key {key}: not a PEM certificate and its private key '
                      f'({e.strerror or e})') from None
  return context


def warm_up(attributor) -> None:
  """One query through the path requests take, so that the first request does not pay for compiling."""
  from PIL import Image
  if attributor.featurizer is None:
    attributor.attribute(features=np.zeros((1, attributor.input_dim), np.float32), k=1)
  else:
    attributor.attribute(image=Image.new('RGB', (64, 64), (128, 128, 128)), prompt='a picture', k=1)


def reload_when_changed(server: AttributionServer, load, every_s: float, stop: threading.Event) -> None:
  """Serves a student whose files another process changed (`attrib add`, `attrib remove` (a takedown),
  `attrib index`, a new distill): every `every_s` seconds the student folder is compared with the one
  loaded; once a change has held still for one look (a save writes several files), a fresh Attributor
  is loaded and warmed up beside the old one, which answers meanwhile, then takes over. A student that
  does not load (a distill half-way) is said on stderr, and the old one goes on answering until the
  files change again. A gs:// student is watched alike, one listing request per look (its objects'
  generations), so a takedown saved from another machine is served too."""
  from attrib.attributor import student_files_state
  from attrib.distill import student_dir
  student = student_dir(server.attributor.workdir)
  loaded = seen = server.attributor.files_state
  said = None
  while not stop.wait(every_s):
    try:
      state = student_files_state(student)
    except FileNotFoundError:  # a file replaced between listing and stat: still changing
      continue
    except Exception as e:  # noqa: BLE001 (a bucket not answering: said once, looked at again)
      if str(e) != said:
        print(f'attrib serve: cannot look at {student} ({type(e).__name__}: {e}); answering with the student '
              'loaded, looking again', file=sys.stderr, flush=True)
        said = str(e)
      continue
    said = None
    if state == loaded or state != seen:
      seen = state
      continue
    try:
      fresh = load()
      warm_up(fresh)
    except Exception as e:  # noqa: BLE001 (said; the loaded student goes on answering)
      print(f'attrib serve: {student} changed but does not load ({type(e).__name__}: {e}); answering with '
            'the student loaded before until it changes again', file=sys.stderr, flush=True)
      loaded = state
      continue
    server.attributor, loaded = fresh, fresh.files_state
    server.reloads += 1
    print(f'attrib serve: reloaded, its files changed: {fresh!r}', file=sys.stderr, flush=True)


def serve_command(workdir: str, host: str, port: int, dino: str | None = None, clip: str | None = None,
                  train_list: str | None = None, reload_every_s: float = 2.0, token_file: str | None = None,
                  tls_cert: str | None = None, tls_key: str | None = None) -> dict:
  """`launch.py attrib serve`: answers until SIGTERM or Ctrl-C, then returns what it answered."""
  from attrib.attributor import Attributor
  from core.config import ConfigError
  from core.workdir import versions
  if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
    raise ConfigError(f'--port {port!r}: expected a port number in [0, 65535] (0: a free one)')
  if not reload_every_s >= 0:
    raise ConfigError(f'--reload-every {reload_every_s!r}: expected seconds >= 0 (0: never reload)')
  token, tls = read_token(token_file), tls_context(tls_cert, tls_key)
  try:  # the address first: one in use is said before the student loads
    server = AttributionServer(None, host, port, token, tls)
  except OSError as e:
    raise UserError(f'cannot listen on {host}:{port} ({e.strerror or e}): give another --port or --host, '
                    'or stop what holds it') from None
  load = lambda: Attributor.load(workdir, dino=dino, clip=clip, train_list=train_list)
  try:
    server.attributor = load()
    warm_up(server.attributor)
  except BaseException:
    server.server_close()
    raise
  stop_watching = threading.Event()
  watcher = threading.Thread(target=reload_when_changed, args=(server, load, reload_every_s, stop_watching),
                             daemon=True)
  if reload_every_s:
    watcher.start()
  # SIGTERM (a service manager's stop) ends serve_forever from another thread: shutdown() waits for
  # the loop, which runs in this one.
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(target=server.shutdown).start())
  guarded = ', token asked' if token else ''
  print(f'attrib serve: {server.attributor!r} on {server.url} (POST /attribute, GET /health{guarded}); '
        'SIGTERM or Ctrl-C stops it', file=sys.stderr, flush=True)
  missing = [what for what, given in (('a token', token), ('TLS', tls)) if not given]
  if host not in ('127.0.0.1', 'localhost', '::1') and missing:
    print(f'attrib serve: warning: listening on {host} without {" or ".join(missing)}: whoever reaches this port '
          'can query the student (or read the traffic); --token-file and --tls-cert/--tls-key, or a proxy with '
          'them', file=sys.stderr, flush=True)
  started = time.time()
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    # Nothing of the student's may still run when the interpreter exits (see stop_answering): the
    # watcher finishes a reload it began, and requests in flight get their answers.
    stop_watching.set()
    signal.signal(signal.SIGTERM, previous)
    server.stop_answering()
    if watcher.is_alive():
      watcher.join(timeout=300)
    server.server_close()
  return {'job': 'attrib serve', 'workdir': str(workdir), 'url': server.url,
          'served_s': round(time.time() - started, 1), 'requests': server.counts(), 'reloads': server.reloads,
          'versions': versions()}
