"""MkDocs hook: the benchmark results (bench/RESULTS.md and its plots) are published with the
site as ``bench/RESULTS.md``, from where ``make bench`` writes them."""

from pathlib import Path

from mkdocs.structure.files import File


def on_files(files, config):
    root = Path(config["config_file_path"]).parent
    bench = root / "bench"
    for path in [bench / "RESULTS.md", *sorted(bench.glob("*.png"))]:
        files.append(File(path.relative_to(root).as_posix(), str(root), config["site_dir"],
                          config["use_directory_urls"]))
    return files
