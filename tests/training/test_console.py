"""The console line of a logged step: loss, lr, grad norm, images/s, tokens/s, step time, ETA and MFU."""
import pytest

from qwenvl_jax.training import metrics


def _rates(seconds=10.0, steps=5, peak=None):
  return metrics.throughput(steps=steps, seconds=seconds, tokens_per_step=1024, images=40, step_flops=2e12,
                            num_devices=4, peak=peak)


def test_throughput_arithmetic():
  r = _rates(peak=1e12)
  assert r["step_time_s"] == pytest.approx(2.0) and r["steps_per_s"] == pytest.approx(0.5)
  assert r["images_per_s"] == pytest.approx(4.0) and r["tokens_per_s"] == pytest.approx(512.0)
  assert r["mfu"] == pytest.approx(2e12 * 5 / 10 / (4 * 1e12))  # 0.25


def test_line_with_a_known_chip():
  line = metrics.console_line(100, 1000, {"loss": 1.5, "lr": 2e-4, "grad_norm": 0.75, **_rates(peak=1e12)})
  assert line == ("step 100/1000: loss=1.5, lr=0.0002, grad_norm=0.75, 4 images/s, 512 tokens/s, step 2s, "
                  "ETA 30m00s, MFU 25.0%")


def test_line_on_cpu_and_in_the_compiling_interval():
  line = metrics.console_line(5, 24, {"loss": 2.0, **_rates(seconds=3.0, steps=2)})
  assert "MFU n/a" in line and "step 1.5s" in line and "ETA 28s" in line
  first = metrics.throughput(steps=0, seconds=0, tokens_per_step=0, images=0, step_flops=0, num_devices=1, peak=None)
  assert metrics.console_line(1, 24, {"loss": 2.0, **first}) == "step 1/24: loss=2"


def test_writer_prints_the_line_without_a_terminal(tmp_path, capsys):
  writer = metrics.MetricsWriter(str(tmp_path), total_steps=7200, initial_step=0, tensorboard=False,
                                 progress_bar=False)
  writer.write(10, {"loss": 3.0, "lr": 1e-3, "grad_norm": 1.0, **_rates(peak=None)})
  writer.close()
  out = capsys.readouterr().out
  assert "step 10/7200: loss=3" in out and "4 images/s" in out and "ETA 3h59m" in out and "MFU n/a" in out
  assert '"step_time_s": 2.0' in (tmp_path / "metrics.jsonl").read_text()
