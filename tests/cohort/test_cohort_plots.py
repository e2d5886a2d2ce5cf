"""The comparison plot: every mode visible, identical curves named, the shaded band explained."""

from fastdml.cohort.plots import plot_comparison


def history(accuracies, ensemble):
    return [
        {"epoch": e + 1, "test_acc/peer0": a, "test_acc/peer1": a, "test_acc/ensemble": b}
        for e, (a, b) in enumerate(zip(accuracies, ensemble, strict=True))
    ]


def test_identical_modes_stay_visible_and_the_band_is_explained(tmp_path):
    dml = [history([50, 60, 70], [55, 65, 75]), history([52, 62, 72], [57, 67, 77])]
    histories = {
        "independent": [history([40, 50, 60], [45, 55, 65])] * 2,
        "dml": dml,
        "dml_e": dml,  # the same steps as dml, by construction
    }
    figure = plot_comparison(histories, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert figure.get_suptitle() == "lines: the mean over 2 seeds; shaded: the seeds' min to max"
    for axes in figure.axes:
        lines = axes.get_lines()
        styles = {(line.get_linestyle(), line.get_marker()) for line in lines}
        assert len(styles) == 3  # a line drawn over another still shows it
        labels = [text.get_text() for text in axes.get_legend().get_texts()]
        assert labels == ["independent", "dml", "dml_e (same as dml)"]
        assert lines[2].get_ydata().tolist() == lines[1].get_ydata().tolist()
