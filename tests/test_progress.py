"""Progress bars where nobody watches a terminal (a TPU VM's job log, nohup, CI): a line of their own
every LOG_EVERY_S seconds, none for a short loop. tqdm's in-place redraws ('\r' and the bar again)
had piled up there into one line of kilobytes."""
import io
import time

from core import progress


class _Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def _lines_of(loop, monkeypatch, every_s: float, stream=None) -> tuple[str, float]:
  stream = io.StringIO() if stream is None else stream
  monkeypatch.setattr('sys.stderr', stream)
  monkeypatch.setattr(progress, 'LOG_EVERY_S', every_s)
  started = time.perf_counter()
  loop()
  return stream.getvalue(), time.perf_counter() - started


def _slow_loop():
  for _ in progress.bar(range(12), desc='distill', unit='step'):
    time.sleep(0.05)


def _train_loop():  # the train loop's bar: updated by hand, the loss beside it
  steps = progress.progress_bar(total=12, initial=0, unit='step', leave=False)
  for step in range(12):
    time.sleep(0.05)
    steps.set_postfix({'loss': 1 / (step + 1)}, refresh=False)
    steps.update(1)
  steps.close()


def test_a_bar_in_a_log_is_a_line_per_interval(monkeypatch):
  for loop, expected in ((_slow_loop, 'distill: '), (_train_loop, 'loss=')):
    text, seconds = _lines_of(loop, monkeypatch, every_s=0.2)
    assert '\r' not in text and text.endswith('\n')
    lines = text.splitlines()
    # At most one line per interval (the loop takes 0.6 s or more: at least one).
    assert 1 <= len(lines) <= seconds / 0.2 + 1, text
    assert all(expected in line and '/12 [' in line for line in lines), text


def test_a_loop_shorter_than_the_interval_prints_nothing_to_a_log(monkeypatch):
  text, _ = _lines_of(lambda: list(progress.bar(range(3), desc='fast')), monkeypatch, every_s=5)
  assert text == ''


def test_on_a_terminal_the_bar_is_redrawn_in_place(monkeypatch):
  text, _ = _lines_of(_slow_loop, monkeypatch, every_s=0.2, stream=_Terminal())
  assert text.count('\r') >= 2 and 'distill: ' in text and '12/12' in text
