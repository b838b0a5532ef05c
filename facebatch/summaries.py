"""A run record as the few lines printed after a run (the CLI, the demo and the job entrypoints)."""

from __future__ import annotations


def format_summary(record: dict) -> str:
    objects = record["objects"]
    lines = [
        f"run {record['run_id']} (pipeline {record['pipeline_version']}) -> {record['out']}",
        f"  listed {objects['listed']}: new {objects['new']}, changed {objects['changed']}, "
        f"retried {objects['retry']}, unchanged {objects['unchanged']}, deleted {objects['deleted']}",
        f"  processed {record['processed']} images: "
        + ", ".join(f"{k} {v}" for k, v in sorted(record["images_by_status"].items()))
        + f"; {record['faces']} faces",
        f"  {record['seconds']['process']:.1f} s processing"
        + (f", {record['images_per_second']:.2f} images/s" if record.get("images_per_second") else ""),
    ]
    return "\n".join(lines)


def format_people_summary(record: dict) -> str:
    faces = record["faces"]
    lines = [
        f"people run {record['run_id']} ({record['mode']}, pipeline {record['pipeline_version']}) -> {record['out']}",
        f"  {faces['faces']} faces: {faces.get('new_faces', 0)} new, {faces.get('assigned_to_existing', 0)} assigned to existing persons, "
        f"{faces['filtered']} filtered, {faces['unassigned']} unassigned",
        f"  {faces['persons']} persons ({faces.get('new_persons', 0)} new, {faces.get('named_persons', 0)} named)",
    ]
    return "\n".join(lines)
