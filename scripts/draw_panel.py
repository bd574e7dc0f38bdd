"""Draw the IrisSegment module panel from Resources/UI/IrisSegment.ui (no Slicer can render it on this project's
machines): the .ui's widget tree, top to bottom, with each control's own text (labels, buttons, section titles,
table columns, placeholders) and the module's real choice lists (IrisSegmentLib.choices, models.model_choices)
in its combo boxes, the node selectors showing the shipped sample pair as Sample Data loads it. Every section is
drawn open (in Slicer "Known structures", "Model and strategy" and "Compare" start collapsed). Not a screenshot:
fonts, sizes and styles are matplotlib's, not Qt's.

    .venv/bin/python scripts/draw_panel.py [--out Resources/Screenshots/panel.png]
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
UI = ROOT / "Resources" / "UI" / "IrisSegment.ui"
#: what the node selectors show after Sample Data > IrisSegment > IrisBrainPair (the widget's first choices)
NODE_SHOWN = {"targetSelector": "ICBM2009a moved", "outputSelector": None, "manualSelector": "ICBM2009a moved manual"}
ROW_H, WIDTH = 0.36, 7.2


def prop(widget: ET.Element, name: str) -> str | None:
    for p in widget.findall("property"):
        if p.get("name") == name:
            el = p.find("string")
            if el is None:
                el = p.find("number")
            return el.text if el is not None and el.text is not None else ""
    return None


def combo_text(name: str) -> str:
    from IrisSegmentLib import choices as c
    from IrisSegmentLib.models import model_choices

    if name == "modelComboBox":
        return model_choices()[0].label
    table = c.COMBO_CONTROLS[name][0]
    return c.choices(table)[0][0]


class Panel:
    def __init__(self):
        import matplotlib

        matplotlib.use("Agg")
        self.rows: list = []  # (kind, indent, payload)

    # -- reading the tree -------------------------------------------------------------------------------------
    def read(self, layout: ET.Element, indent: int = 0) -> None:
        if layout.get("class") == "QFormLayout":
            grid: dict[int, dict[int, ET.Element]] = {}
            for item in layout.findall("item"):
                child = item.find("widget") if item.find("widget") is not None else item.find("layout")
                grid.setdefault(int(item.get("row", 0)), {})[int(item.get("column", 0))] = (child, item.get("colspan"))
            for r in sorted(grid):
                cells = grid[r]
                if 0 in cells and cells[0][1] is None and 1 in cells:
                    self.rows.append(("field", indent, (cells[0][0], cells[1][0])))
                else:
                    for child, _ in cells.values():
                        self.element(child, indent)
            return
        for item in layout.findall("item"):
            for child in item:
                self.element(child, indent)

    def element(self, el: ET.Element, indent: int) -> None:
        if el.tag == "layout":
            if el.get("class") == "QHBoxLayout":
                self.rows.append(("buttons", indent, [w for w in el.iter("widget")]))
            else:
                self.read(el, indent)
            return
        if el.tag != "widget":
            return
        cls = el.get("class")
        if cls in ("ctkCollapsibleButton", "ctkCollapsibleGroupBox"):
            self.rows.append(("section", indent, prop(el, "text") or prop(el, "title")))
            inner = el.find("layout")
            if inner is not None:
                self.read(inner, indent + 1)
        else:
            self.rows.append(("widget", indent, el))

    # -- drawing --------------------------------------------------------------------------------------------
    def draw(self, out: Path) -> None:
        import matplotlib.pyplot as plt
        from matplotlib.patches import FancyBboxPatch, Rectangle

        heights = [self.height(kind, payload) for kind, _, payload in self.rows]
        total = sum(heights) + 0.4
        fig = plt.figure(figsize=(WIDTH, total))
        ax = fig.add_axes([0, 0, 1, 1])
        ax.set_xlim(0, WIDTH)
        ax.set_ylim(total, 0)
        ax.axis("off")
        fig.patch.set_facecolor("#f0f0f0")
        y = 0.2
        for (kind, indent, payload), h in zip(self.rows, heights):
            x = 0.15 + 0.2 * indent
            if kind == "section":
                ax.add_patch(Rectangle((x, y + 0.04), WIDTH - x - 0.15, h - 0.08, fc="#dcdcdc", ec="#a0a0a0"))
                ax.text(x + 0.1, y + h / 2, "\u25bc " + payload, va="center", fontsize=9, weight="bold")
            elif kind == "field":
                label, widget = payload
                ax.text(x + 0.05, y + ROW_H / 2, prop(label, "text") or "", va="center", fontsize=8.5)
                self.widget(ax, widget, x + 2.0, y, WIDTH - x - 2.15)
            elif kind == "buttons":
                n = len(payload)
                w = (WIDTH - x - 0.15 - 0.1 * (n - 1)) / n
                for i, b in enumerate(payload):
                    self.button(ax, FancyBboxPatch, x + i * (w + 0.1), y, w, prop(b, "text") or "")
            else:
                self.widget(ax, payload, x, y, WIDTH - x - 0.15)
            y += h
        fig.savefig(out, dpi=110, facecolor=fig.get_facecolor())
        plt.close(fig)

    def height(self, kind: str, payload) -> float:
        if kind == "widget":
            cls = payload.get("class")
            return {"QTableWidget": 1.05, "QListWidget": 0.55, "QPlainTextEdit": 0.55, "qMRMLTableView": 0.7,
                    "QLabel": 0.32 * (1 + len(prop(payload, "text") or "") // 95)}.get(cls, ROW_H)
        return ROW_H

    @staticmethod
    def button(ax, patch, x, y, w, text):
        ax.add_patch(patch((x, y + 0.05), w, ROW_H - 0.1, boxstyle="round,pad=0.0,rounding_size=0.05",
                           fc="#fafafa", ec="#8a8a8a"))
        ax.text(x + w / 2, y + ROW_H / 2, text, ha="center", va="center", fontsize=8)

    def widget(self, ax, el: ET.Element, x: float, y: float, w: float) -> None:
        from matplotlib.patches import FancyBboxPatch, Rectangle

        cls, name = el.get("class"), el.get("name")
        h = self.height("widget", el) if cls in ("QTableWidget", "QListWidget", "QPlainTextEdit",
                                                   "qMRMLTableView") else ROW_H

        def box(text, grey=False, arrow=False):
            ax.add_patch(Rectangle((x, y + 0.05), w, h - 0.1, fc="white", ec="#8a8a8a"))
            ax.text(x + 0.08, y + 0.05 + (ROW_H - 0.1) / 2, text, va="center", fontsize=8,
                    color="#808080" if grey else "black")
            if arrow:
                ax.text(x + w - 0.15, y + ROW_H / 2, "\u25be", va="center", ha="center", fontsize=9)

        if cls == "QComboBox":
            box(combo_text(name), arrow=True)
        elif cls == "qMRMLNodeComboBox":
            shown = NODE_SHOWN.get(name)
            box(shown or prop(el, "noneDisplay") or "None", grey=shown is None, arrow=True)
        elif cls == "ctkPathLineEdit":
            box("", grey=True)
            ax.add_patch(Rectangle((x + w - 0.35, y + 0.08), 0.3, ROW_H - 0.16, fc="#eeeeee", ec="#8a8a8a"))
            ax.text(x + w - 0.2, y + ROW_H / 2, "...", ha="center", va="center", fontsize=8)
        elif cls == "QLineEdit":
            box(prop(el, "placeholderText") or "", grey=True)
        elif cls == "QSpinBox":
            box(prop(el, "value") or "0")
        elif cls == "QPushButton":
            self.button(ax, FancyBboxPatch, x, y, w, prop(el, "text") or "")
        elif cls == "QLabel":
            import textwrap

            text = prop(el, "text") or ""
            ax.text(x, y + 0.05, "\n".join(textwrap.wrap(text, 95)) or " ", va="top", fontsize=8)
        elif cls == "QProgressBar":
            ax.add_patch(Rectangle((x, y + 0.1), w, ROW_H - 0.2, fc="white", ec="#8a8a8a"))
            ax.text(x + w / 2, y + ROW_H / 2, "0%", ha="center", va="center", fontsize=7)
        elif cls == "QTableWidget":
            cols = [c.find("property/string").text for c in el.findall("column")]
            ax.add_patch(Rectangle((x, y + 0.05), w, h - 0.1, fc="white", ec="#8a8a8a"))
            cw = w / len(cols)
            row = ["Colin27", "Colin27 segmentation", ""]  # the first choices of the sample pair
            for i, c in enumerate(cols):
                ax.add_patch(Rectangle((x + i * cw, y + 0.05), cw, 0.3, fc="#e8e8e8", ec="#b0b0b0"))
                ax.text(x + i * cw + 0.06, y + 0.2, c, va="center", fontsize=7.5)
                ax.text(x + i * cw + 0.06, y + 0.52, row[i] + (" \u25be" if i < 2 else ""), va="center", fontsize=7.5)
        else:  # QListWidget, QPlainTextEdit, qMRMLTableView: an empty area
            ax.add_patch(Rectangle((x, y + 0.05), w, h - 0.1, fc="white", ec="#8a8a8a"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "Resources" / "Screenshots" / "panel.png")
    args = ap.parse_args(argv)
    root = ET.parse(UI).getroot().find("widget")
    panel = Panel()
    panel.read(root.find("layout"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    panel.draw(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
