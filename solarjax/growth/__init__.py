"""Growing a model: depth up-scaling plans (:mod:`.plans`) applied to params and HF checkpoints
(:mod:`.dus`), sparse upcycling (:mod:`.upcycle`), the one entry point for ``+``-chained growth
specs (:func:`grown_config`, :func:`grow` in :mod:`.grow`), and compute-matched growth studies
(:mod:`.study` runs them, :mod:`.stats` analyses them, :mod:`.report` writes tables and plots).
"""

from solarjax.growth.grow import grow, grow_loaded, growth_steps, grown_config, is_upcycle
from solarjax.growth.report import (mean_curves, plot_loss_vs_flops, plot_paired, read_records, speedup_table,
                                    summary_lines, write_report)
from solarjax.growth.stats import analyse, first_crossing, log_interp, t_interval
from solarjax.growth.study import (MODES, NOT_YET_AVAILABLE, BatchWindow, Operator, StudyConfig, StudyData,
                                   StudyRunner, batch_checksum, check_same_batches, growth_operators, load_data,
                                   reference_arm, run_study, seam_operators, segment_flops, select_operators,
                                   stage_steps)

__all__ = ["MODES", "NOT_YET_AVAILABLE", "BatchWindow", "Operator", "StudyConfig", "StudyData", "StudyRunner",
           "analyse", "batch_checksum", "check_same_batches", "first_crossing", "grow", "grow_loaded",
           "growth_operators", "growth_steps", "grown_config", "is_upcycle", "load_data", "log_interp",
           "mean_curves", "plot_loss_vs_flops", "plot_paired", "read_records", "reference_arm", "run_study",
           "seam_operators", "segment_flops", "select_operators", "speedup_table", "stage_steps",
           "summary_lines", "t_interval", "write_report"]
