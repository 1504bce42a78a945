"""Metric logging: metrics.jsonl (append-only), metrics.csv, TensorBoard, PNG plots.

Every record is `{'step': int, 'kind': 'train'|'eval'|..., <name>: float, ...}`. The JSONL
file is appended to, so nothing written before a crash is lost. A resumed run first drops the
records after its checkpoint's step (it writes those steps again), so no step has two rows;
the CSV and the plots are rebuilt from the JSONL.

TensorBoard event files are written with tensorboardX (no TensorFlow needed).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Mapping


def read_jsonl(path: str) -> list[dict]:
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # A line cut short by a kill; the rest is still good.
    return records


def latest_records(records: list[dict]) -> list[dict]:
    """The last record for each (kind, step), ordered by step."""
    by_key = {}
    for r in records:
        by_key[(r.get('kind', 'train'), r['step'])] = r
    return sorted(by_key.values(), key=lambda r: (r['step'], r.get('kind', '')))


def _to_float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


class MetricWriter:
    """Writes metrics of one run; only process 0 writes (`enabled=False` elsewhere)."""

    def __init__(
        self,
        workdir: str,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        """`resume_step`: the step a resumed run restarts from; records after it are dropped."""
        self.workdir = workdir
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
        self.csv_path = os.path.join(workdir, 'metrics.csv')
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            if resume_step is not None and os.path.exists(self.jsonl_path):
                kept = [r for r in read_jsonl(self.jsonl_path) if r['step'] <= resume_step]
                tmp = self.jsonl_path + '.tmp'
                with open(tmp, 'w') as f:
                    f.writelines(json.dumps(r) + '\n' for r in kept)
                os.replace(tmp, self.jsonl_path)  # Atomic: a kill here leaves the old file whole.
            self._jsonl = open(self.jsonl_path, 'a')
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
                except ImportError:
                    print('tensorboardX is not installed; skipping TensorBoard logs.')

    def write(self, step: int, metrics: Mapping[str, Any], kind: str = 'train') -> None:
        if not self.enabled:
            return
        record = {'step': int(step), 'kind': kind}
        record.update({k: _to_float(v) for k, v in metrics.items()})
        # json writes NaN/Infinity tokens, which json.loads reads back.
        self._jsonl.write(json.dumps(record) + '\n')
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ('step', 'kind') and math.isfinite(v):
                    self._tb.add_scalar(f'{kind}/{k}', v, int(step))

    def write_text(self, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, 0)

    def flush(self) -> None:
        if not self.enabled:
            return
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
        self.write_csv()

    def write_csv(self) -> None:
        records = latest_records(read_jsonl(self.jsonl_path))
        if not records:
            return
        columns = ['step', 'kind'] + sorted({k for r in records for k in r} - {'step', 'kind'})
        tmp = self.csv_path + '.tmp'
        with open(tmp, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(records)
        os.replace(tmp, self.csv_path)  # Atomic: a reader never sees half a file.

    def plot(self, steps_per_epoch: int | None = None, label_smoothing: float = 0.0) -> list[str]:
        """Writes loss.png, accuracy.png and lr.png (plot_metrics); returns the paths written."""
        if not self.enabled:
            return []
        return plot_metrics(self.jsonl_path, self.workdir, steps_per_epoch, label_smoothing)

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def plot_metrics(
    jsonl_path: str, out_dir: str, steps_per_epoch: int | None = None, label_smoothing: float = 0.0
) -> list[str]:
    """loss.png, accuracy.png and lr.png from the run's records: training curves as lines,
    test evaluations as markers, against epochs when `steps_per_epoch` is known (else steps).
    The training loss says what it includes (label smoothing), since it is not the test NLL."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    records = latest_records(read_jsonl(jsonl_path))
    per = float(steps_per_epoch) if steps_per_epoch else 1.0

    def series(kind, key):
        pts = [
            (r['step'] / per, r[key])
            for r in records
            if r.get('kind') == kind and key in r and math.isfinite(_to_float(r[key]))
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    def test_label(key, what):
        return f'test {what}' + (', EMA weights' if key.startswith('ema_') else '')

    eval_keys = sorted({k for r in records if r.get('kind') == 'eval' for k in r})
    train_loss = (
        'train loss (cross-entropy'
        + (f', label smoothing {label_smoothing:g}' if label_smoothing else '')
        + ', batch mean)'
    )
    figures = {
        'loss.png': (
            'loss',
            [('train', 'loss', train_loss)]
            + [
                ('eval', k, test_label(k, 'loss (cross-entropy, no smoothing)'))
                for k in eval_keys
                if k.endswith('loss')
            ],
        ),
        'accuracy.png': (
            'accuracy',
            [('train', 'accuracy', 'train accuracy (augmented batches)')]
            + [('eval', k, test_label(k, 'accuracy')) for k in eval_keys if k.endswith('accuracy')],
        ),
        'lr.png': ('learning rate', [('train', 'lr', 'learning rate')]),
    }
    written = []
    for fname, (ylabel, lines) in figures.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for kind, key, label in lines:
            xs, ys = series(kind, key)
            if not xs:
                continue
            if kind == 'eval':  # a few evaluations: points, not a line drawn between them
                ax.plot(xs, ys, linestyle='none', marker='o', markersize=6, label=label)
            else:
                ax.plot(xs, ys, linewidth=1.2, label=label)
        ax.set_xlabel('epoch' if steps_per_epoch else 'step')
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
