"""Write README.md from nbs/index.ipynb (markdown cells as they are, code cells fenced with their text output;
`#| echo: false` cells show their outputs only).

nbdev's own `nbdev_readme` renders through Quarto, which cannot be installed from a package
registry; this keeps README.md a plain function of the index notebook, and CI checks it is in sync.
Image outputs are written next to README under `docs/readme/` and linked.
"""
import base64, json, sys
from pathlib import Path

def make_readme(nb_path="nbs/index.ipynb", out_path="README.md", img_dir="docs/readme"):
    nb = json.loads(Path(nb_path).read_text(encoding="utf-8"))
    parts, n_img = [], 0
    for cell in nb["cells"]:
        src = "".join(cell["source"]).rstrip()
        if cell["cell_type"] == "markdown":
            parts.append(src)
            continue
        if src.startswith("#| hide") or not src: continue
        echo = not any(l.replace(" ", "") == "#|echo:false" for l in src.splitlines())   # Quarto's flag: outputs only
        src = "\n".join(l for l in src.splitlines() if not l.startswith("#|"))
        if echo: parts.append(f"```python\n{src}\n```")
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data:
                Path(img_dir).mkdir(parents=True, exist_ok=True)
                n_img += 1; name = f"{img_dir}/index_{n_img}.png"
                Path(name).write_bytes(base64.b64decode(data["image/png"]))
                parts.append(f"![]({name})")
            elif "text/markdown" in data: parts.append("".join(data["text/markdown"]).rstrip())
            elif out.get("output_type") == "stream" or "text/plain" in data:
                text = "".join(out.get("text", data.get("text/plain", ""))).rstrip()
                if text: parts.append(f"```\n{text}\n```")
    Path(out_path).write_text("\n\n".join(parts) + "\n", encoding="utf-8")

if __name__ == "__main__":
    make_readme(*sys.argv[1:])
