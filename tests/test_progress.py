"""Progress output on a terminal (a redrawn bar) and in logs (periodic plain lines), with a fake clock."""
import io
import re

import pytest

from cogview_ray.progress import LOG_INTERVAL_S, RATE_WINDOW_S, Progress, format_eta

pytestmark = pytest.mark.timeout(30)


class FakeStream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_terminal_bar_redraws_one_line_with_rate_eta_and_workers():
    out, clock = FakeStream(tty=True), FakeClock()
    p = Progress(total_rows=100, workers=4, out=out, clock=clock)
    assert p.tty and p.interval_s == 0.5
    clock.t += 5.0
    p.advance(10, ok=8)  # 8 images in 5 s; 90 rows left at 2 rows/s
    p.workers_alive = 3
    p.tick()
    text = out.getvalue()
    assert text.startswith("\r") and "\n" not in text and text.endswith("\x1b[K")
    assert "|" + "#" * 2 + "." * 22 + "|" in text  # 10% of a 24-wide bar
    assert "10/100 rows (10%)" in text and "8 images" in text
    assert "1.60 img/s" in text and "ETA 0m45s" in text and "workers 3/4" in text
    clock.t += 0.1
    p.tick()  # throttled: within 0.5 s of the last draw
    assert out.getvalue() == text
    clock.t += 5.0
    p.advance(90, ok=90)
    p.close()
    last = out.getvalue()[len(text):]
    assert last.startswith("\r") and last.endswith("\n")
    assert "100/100 rows (100%)" in last and "98 images" in last and "ETA 0m00s" in last
    assert "|" + "#" * 24 + "|" in last
    p.close()  # idempotent
    assert out.getvalue().endswith("\x1b[K\n") and out.getvalue().count("\n") == 1


def test_log_mode_prints_plain_lines_at_the_interval():
    out, clock = FakeStream(tty=False), FakeClock()
    p = Progress(total_rows=60, workers=2, out=out, clock=clock)
    assert not p.tty and p.interval_s == LOG_INTERVAL_S
    clock.t += 10.0
    p.advance(6, ok=6)
    p.tick()
    assert out.getvalue() == ""  # not yet due
    clock.t += LOG_INTERVAL_S
    p.tick()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue() and "#" not in lines[0]
    assert lines[0] == "[cogview-ray] 6/60 rows (10%) | 6 images | 0.15 img/s | ETA 6m00s | workers 2/2"
    clock.t += 1.0
    p.close()
    assert len(out.getvalue().splitlines()) == 2 and out.getvalue().endswith("\n")


def test_rate_follows_the_trailing_window_not_the_whole_run():
    out, clock = FakeStream(tty=False), FakeClock()
    p = Progress(total_rows=10_000, workers=1, out=out, clock=clock)
    for _ in range(10):  # slow start: 1 image every 10 s
        clock.t += 10.0
        p.advance(1, ok=1)
    for _ in range(60):  # then 10 images/s for 3 minutes
        clock.t += 3.0
        p.advance(30, ok=30)
    rows_s, images_s = p.rates()
    assert images_s == pytest.approx(10.0, rel=0.05)
    whole_run = p.ok / (clock.t - p.started)
    assert whole_run < 7.0  # the whole-run average would understate the current rate
    assert p.eta_s() == pytest.approx((10_000 - p.done) / rows_s)
    assert RATE_WINDOW_S == 120.0


def test_stalled_run_shows_falling_rate_and_unknown_eta():
    out, clock = FakeStream(tty=False), FakeClock()
    p = Progress(total_rows=10, workers=1, out=out, clock=clock)
    assert p.eta_s() == float("inf")
    assert "ETA ?" in p.line() and "0.00 img/s" in p.line()
    clock.t += 10
    p.advance(2, ok=1)  # one failed or rejected row: rows count, images do not
    before = p.rates()[1]
    clock.t += 10
    assert p.rates()[1] == pytest.approx(before / 2)


def test_stream_without_isatty_is_log_mode_and_tty_can_be_forced():
    class Bare:
        def __init__(self):
            self.parts = []

        def write(self, s):
            self.parts.append(s)

        def flush(self):
            pass

    bare = Bare()
    p = Progress(total_rows=0, workers=1, out=bare, clock=FakeClock())
    p.close()
    assert not p.tty and re.fullmatch(r"\[cogview-ray\] 0/0 rows \(100%\).*\n", "".join(bare.parts))
    assert Progress(5, 1, out=FakeStream(tty=False), tty=True).tty


@pytest.mark.parametrize("seconds,text", [(0, "0m00s"), (59.4, "0m59s"), (61, "1m01s"), (3600, "1h00m"),
                                          (3 * 86400 + 7200, "3d02h"), (float("inf"), "?"),
                                          (float("nan"), "?")])
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text
