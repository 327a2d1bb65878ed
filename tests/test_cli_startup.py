"""`forvalue --help` and `forvalue merge` load neither torch nor grpc (a fresh interpreter,
so that nothing imported by other tests counts)."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys
    from forvalue.bindings.cli import main

    try:
        main(["--help"])
    except SystemExit:
        pass
    status = main(["merge", *sys.argv[1:3], "--out", sys.argv[3]])
    print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
""")


def test_help_and_merge_import_neither_torch_nor_grpc(tmp_path):
    parts = []
    for index in (0, 1):
        part = tmp_path / f"part{index}.jsonl"
        part.write_text(json.dumps({"id": f"s{index}", "index": index, "value": 0.5}) + "\n")
        parts.append(str(part))
    out = tmp_path / "merged.jsonl"
    run = subprocess.run([sys.executable, "-c", SCRIPT, *parts, str(out)], capture_output=True, text=True,
                         check=True)
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["status"] == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["s0", "s1"]
    loaded = {name.split(".")[0] for name in report["modules"]}
    assert "torch" not in loaded and "grpc" not in loaded
