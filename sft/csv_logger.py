"""metrics.csv for sft-train (`logger=csv`, the default), kept whole across a resume."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment


class ResumableCSVLogger(CSVLogger):
    """`metrics.csv` in the run directory. Lightning's CSV writer deletes an existing file when it starts;
    a resumed run keeps the rows logged before its checkpoint (steps below `resume_step`) instead, so the
    file holds one run's whole history."""

    def __init__(self, save_dir: Path, resume_step: int | None = None):
        super().__init__(save_dir=save_dir, name="", version="")
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        kept, header = [], []
        if self.resume_step is not None and path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                header = list(reader.fieldnames or [])
                kept = [row for row in reader if int(row["step"]) < self.resume_step]
        with warnings.catch_warnings():  # its "previous log files will be deleted" is handled right below
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            writer = super().experiment  # creates the writer, which removes the old file
        if kept:
            with open(path, "w", newline="") as handle:
                csv_writer = csv.DictWriter(handle, fieldnames=header)
                csv_writer.writeheader()
                csv_writer.writerows(kept)
            writer.metrics_keys = sorted(header)
        return writer
