"""A run's folder and its records: readable names, records written whole, untrusted ones ignored."""

from __future__ import annotations

from slerp_plugin.integrations.airflow import records


def test_run_folders_have_readable_names(tmp_path):
    assert records.run_folder_name("manual__2026-12-01T02:00:00+00:00") == "manual__2026-12-01T02-00-00+00-00"
    assert records.run_folder_name("../x") == "..-x" and records.run_folder_name("..") == "run-.."
    assert records.run_dir(tmp_path, "dag", "a/b").parent == tmp_path / "dag"


def test_records_round_trip_and_invalid_ones_are_ignored(tmp_path):
    records.write_run(tmp_path, "dag", "run:1")
    assert records.read_record(tmp_path, records.RUN_RECORD, records.RunRecord).run_id == "run:1"
    records.write_failure(tmp_path, "merge", 3, RuntimeError("first line\nsecond line hf_abcdefghijkl"))
    failure = records.read_record(tmp_path, records.FAILURE_RECORD, records.FailureRecord)
    assert (failure.task_id, failure.try_number, failure.error) == ("merge", 3, "first line")
    records.write_failure(tmp_path, "merge", 3, "token hf_abcdefghijkl leaked?")
    assert "hf_***" in records.read_record(tmp_path, records.FAILURE_RECORD, records.FailureRecord).error
    records.clear_failure(tmp_path)
    assert records.read_record(tmp_path, records.FAILURE_RECORD, records.FailureRecord) is None
    (tmp_path / records.SWEEP_RECORD).write_text('{"chosen_t": "<b>"}')
    assert records.read_record(tmp_path, records.SWEEP_RECORD, records.SweepRecord) is None
    records.write_sweep(tmp_path, 0.5, "/m/merged-t0.5")
    assert records.read_record(tmp_path, records.SWEEP_RECORD, records.SweepRecord).chosen_t == 0.5
