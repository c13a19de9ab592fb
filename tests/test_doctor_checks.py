"""Every check `probes doctor` lists can fire: one constructed store per check, on which that check
must fail (or warn, as documented), next to the healthy store of tests/test_doctor.py that passes
every step. Stores are tiny (<= 200 items, 3-4 layers x 16 dims), folds 3, permutations 20.
"""
from __future__ import annotations

import json
import warnings

import h5py
import numpy as np

from featstore.cv import describe_folds, make_folds
from probes.doctor import FAIL, PASS, SKIP, WARN, run_doctor
from tests.test_doctor import CLASSES, FAST, assert_fails_at, build_store, column, cue_item, healthy, set_column


def doctor(path, tmp_path, **kw):
    return run_doctor(path, out_dir=tmp_path / "out", **{**FAST, **kw})


def by_speaker_counts(counts) -> list[tuple[int, int]]:
    """A design from ``counts[speaker][label]`` (items of one speaker together, label by label)."""
    return [(s, y) for s, row in enumerate(counts) for y, n in enumerate(row) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# 1. data sanity
# ---------------------------------------------------------------------------------------------
def test_items_with_bad_status_warn(tmp_path):
    path = healthy(tmp_path / "h.h5")
    status = column(path, "status")
    status[[0, 7, 50]] = "unreadable"
    set_column(path, "status", status)
    s = doctor(path, tmp_path).step("data sanity")
    assert s.status == WARN
    assert "3 items have status != ok (unreadable: 3) and are skipped" in s.message
    assert s.evidence["usable_items"] == 177 and s.evidence["status_counts"] == {"unreadable": 3}


def test_unlabelled_items_warn(tmp_path):
    path = healthy(tmp_path / "h.h5")
    labels = column(path, "label")
    labels[:4] = ""
    set_column(path, "label", labels)
    s = doctor(path, tmp_path).step("data sanity")
    assert s.status == WARN and "4 items have no label and are skipped" in s.message


def test_clips_of_one_or_two_frames_warn(tmp_path):
    def item(rng, s, y, j):
        x, ns = cue_item(rng, s, y, j)
        return (x[:, :2], 320 * 2 + 80) if j == 0 else (x, ns)

    s = doctor(build_store(tmp_path / "s.h5", item=item), tmp_path).step("data sanity")
    assert s.status == WARN and "30 ok items have only 1-2 frames" in s.message
    assert s.evidence["clips_0_2_frames"] == 30


def test_ok_items_without_frames_fail(tmp_path):
    path = healthy(tmp_path / "h.h5")
    nfr = column(path, "num_frames").astype(np.int64)
    nfr[5] = 0
    set_column(path, "num_frames", nfr)
    report = doctor(path, tmp_path)
    assert_fails_at(report, "data sanity")
    assert "1 items have status ok but 0 frames" in report.step("data sanity").message


def test_duplicated_audio_with_one_label_warns(tmp_path):
    path = healthy(tmp_path / "h.h5")
    sha = column(path, "sha256")
    sha[1] = sha[0]  # two takes of speaker 0 with the same content
    set_column(path, "sha256", sha)
    s = doctor(path, tmp_path).step("data sanity")
    assert s.status == WARN and "1 clips occur more than once" in s.message
    assert s.evidence["duplicated_audio"] == 1 and s.evidence["duplicated_audio_conflicting_labels"] == 0


def test_no_labelled_items_fail_and_skip(tmp_path):
    path = healthy(tmp_path / "h.h5")
    set_column(path, "label", [""] * 180)
    report = doctor(path, tmp_path)
    assert report.step("data sanity").status == FAIL
    assert "no labelled items with status ok" in report.step("data sanity").message
    assert all(s.status == SKIP for s in report[1:])


def test_class_with_one_speaker_fails_and_skips(tmp_path):
    design = [(s, 0 if s < 10 else 1) for s in range(20) for _ in range(6)] + [(20, 2)] * 6
    report = doctor(build_store(tmp_path / "o.h5", design=design), tmp_path)
    s = report.step("data sanity")
    assert s.status == FAIL and "class 'Interdental' has only 1 speaker" in s.message
    assert all(x.status == SKIP and x.caused_by == "data sanity" for x in report[1:])


def test_class_with_fewer_speakers_than_folds_warns(tmp_path):
    design = [(s, 0 if s < 10 else 1) for s in range(20) for _ in range(6)] + [(s, 2) for s in (20, 21) for _ in range(6)]
    report = doctor(build_store(tmp_path / "f.h5", design=design), tmp_path)
    s = report.step("data sanity")
    assert s.status == WARN and "class 'Interdental' has 2 speakers, fewer than the 3 folds" in s.message
    assert report.step("fold sanity").status == WARN
    assert "using 2 folds instead of 3" in report.step("fold sanity").message


def test_store_without_groups_warns_in_data_sanity(tmp_path):
    path = healthy(tmp_path / "n.h5")
    set_column(path, "group", [""] * 180)
    s = doctor(path, tmp_path).step("data sanity")
    assert s.status == WARN and "the store has no speaker groups" in s.message


def test_majority_class_above_80_percent_warns(tmp_path):
    design = [(s, 0 if s < 26 else 1 + s % 2) for s in range(30) for _ in range(6)]
    s = doctor(build_store(tmp_path / "m.h5", design=design), tmp_path).step("data sanity")
    assert s.status == WARN and "the majority class holds 87 % of the items" in s.message


# ---------------------------------------------------------------------------------------------
# 2. confounds
# ---------------------------------------------------------------------------------------------
def test_loudness_confound_fails(tmp_path):
    path = healthy(tmp_path / "l.h5", cue_strength=0.3)
    labels = column(path, "label")
    rng = np.random.default_rng(0)
    loud = {"Normal": -30.0, "Lateral": -20.0, "Interdental": -10.0}
    set_column(path, "rms_db", [loud[v] + rng.normal() for v in labels])
    report = doctor(path, tmp_path)
    assert_fails_at(report, "confounds")
    s = report.step("confounds")
    assert s.evidence["loudness_balanced_accuracy"] > 0.9 and s.evidence["loudness_p_value"] < 0.05
    assert s.message.startswith("loudness alone predict(s) the label")
    assert abs(s.evidence["duration_balanced_accuracy"] - 1 / 3) < 0.2


def test_weak_duration_confound_warns(tmp_path):
    ranges = [(4, 11), (5, 12), (7, 14)]  # clip lengths overlap, but longer clips lean to one class

    def item(rng, s, y, j):
        return cue_item(rng, s, y, j, frames=ranges[y])

    s = doctor(build_store(tmp_path / "w.h5", item=item), tmp_path).step("confounds")
    assert s.status == WARN, s.message
    assert 0.10 <= s.evidence["duration_balanced_accuracy"] - 1 / 3 < 0.20
    assert s.evidence["significant"] == {"duration": "warn"}
    assert s.advice.startswith("duration carries some label information")


def test_label_decodable_only_through_speakers_warns(tmp_path):
    # no label cue, strong speakers; with speakers shared between train and test the label is
    # "decoded" by recognising the speaker, held-out speakers score at chance
    path = healthy(tmp_path / "s.h5", cue_strength=0.0, speaker_strength=3.0, n_speakers=60)
    s = doctor(path, tmp_path).step("confounds")
    assert s.status == WARN, s.message
    assert s.evidence["significant"] == {"speaker": "warn"}
    assert s.evidence["label_score_speakers_shared"] - s.evidence["label_score_speakers_held_out"] >= 0.2
    assert s.evidence["speaker_id_accuracy"] > 0.9
    assert "only decodable by recognising speakers" in s.advice


# ---------------------------------------------------------------------------------------------
# 3. fold sanity
# ---------------------------------------------------------------------------------------------
def test_identical_audio_across_folds_fails_without_label_conflict(tmp_path):
    path = healthy(tmp_path / "h.h5")
    sha, labels, groups = column(path, "sha256"), column(path, "label"), column(path, "group")
    first = 0
    same = np.flatnonzero((labels == labels[first]) & (groups != groups[first]))  # same label, other speakers
    sha[same] = sha[first]
    set_column(path, "sha256", sha)
    report = doctor(path, tmp_path)
    assert report.step("data sanity").status == WARN  # duplicated, labels agree
    assert_fails_at(report, "fold sanity")
    assert report.step("fold sanity").evidence["identical_audio_across_folds"] >= 1


def test_class_missing_from_a_training_part_fails(tmp_path):
    # two speakers of 'Normal'; the one with most of them only says 'Normal': with 2 folds, the
    # stratified grouping puts both 'Normal' speakers into one test part
    counts = [[7, 9], [0, 4], [0, 1], [22, 0]]
    design = by_speaker_counts(counts)
    labels = np.array([CLASSES[y] for _, y in design], dtype=object)
    groups = np.array([f"spk{s:03d}" for s, _ in design], dtype=object)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer folds than asked: 'Normal' has two speakers
        info = describe_folds(make_folds(labels, groups, 3, 0), labels, groups)
    assert (info["train_Normal"] == 0).any()  # what featstore.cv makes of these speakers
    report = doctor(build_store(tmp_path / "t.h5", design=design), tmp_path)
    assert_fails_at(report, "fold sanity")
    s = report.step("fold sanity")
    assert s.evidence["folds_missing_a_class_in_train"] == 1 and "have a class missing from training" in s.message


def test_class_missing_from_a_test_part_warns(tmp_path):
    counts = [[1, 10, 2], [3, 3, 8], [1, 0, 5], [1, 5, 0], [3, 11, 0], [1, 0, 0]]
    report = doctor(build_store(tmp_path / "t.h5", design=by_speaker_counts(counts)), tmp_path)
    s = report.step("fold sanity")
    assert s.status == WARN, s.message
    assert s.evidence["folds_missing_a_class_in_test"] == 1 and s.evidence["folds_missing_a_class_in_train"] == 0
    assert "1 folds have a class missing from the test part" in s.message


def test_items_without_a_group_warn(tmp_path):
    path = healthy(tmp_path / "h.h5")
    groups = column(path, "group")
    groups[:6] = ""  # speaker 0's items lost their speaker
    set_column(path, "group", groups)
    s = doctor(path, tmp_path).step("fold sanity")
    assert s.status == WARN
    assert "6 items have no speaker group; each is treated as its own speaker" in s.message


def test_speaker_column_that_differs_from_the_group_warns(tmp_path):
    extra = {"speaker": lambda s, y, j: f"talker{(s + j) % 30}"}  # not the same partition as the groups
    s = doctor(build_store(tmp_path / "k.h5", extra=extra), tmp_path).step("fold sanity")
    assert s.status == WARN
    assert "the column 'speaker' looks like the speaker but differs from the group column" in s.message
    assert s.advice == "re-extract with --group-column speaker"
    same = {"speaker": lambda s, y, j: f"talker{s}"}  # the same partition under other names: fine
    assert doctor(build_store(tmp_path / "k2.h5", extra=same), tmp_path / "2").step("fold sanity").status == PASS


def test_single_item_groups_without_clusters_warn(tmp_path):
    path = healthy(tmp_path / "g.h5", speaker_strength=0.0)  # no speaker structure left to find
    set_column(path, "group", column(path, "id"))
    s = doctor(path, tmp_path).step("fold sanity")
    assert s.status == WARN
    assert s.message.startswith("the group column equals the item id; if speakers recorded several clips")
    assert s.evidence["nearest_neighbour_ratio"] >= 0.7 * s.evidence["nearest_neighbour_ratio_unclustered"]


# ---------------------------------------------------------------------------------------------
# 4. features and alignment: labels shifted by one row
# ---------------------------------------------------------------------------------------------
def test_labels_rotated_by_one_item_fail_alignment(tmp_path):
    # items stored speaker by speaker; the label column is one row late: every speaker's first
    # item carries the previous speaker's label (the old tiny-subset overfit passed this store)
    path = healthy(tmp_path / "r.h5", cue_strength=3.0)
    set_column(path, "label", np.roll(column(path, "label"), 1))
    report = doctor(path, tmp_path)
    assert_fails_at(report, "features and alignment")
    s = report.step("features and alignment")
    assert s.evidence["shift"] == 1 and s.evidence["shift_gain"] >= 0.05 and s.evidence["shift_p_value"] <= 0.05
    assert "each item takes the label of the next row" in s.message
    assert "shifted by one row" in s.message


def test_labels_rotated_in_a_shuffled_store_fail_alignment(tmp_path):
    # items in random order: the rotated labels carry no signal at all, the shifted ones all of it
    order = np.random.default_rng(5).permutation(180)
    path = build_store(tmp_path / "r.h5", order=order)
    set_column(path, "label", np.roll(column(path, "label"), -1))
    report = doctor(path, tmp_path)
    assert_fails_at(report, "features and alignment")
    s = report.step("features and alignment")
    assert s.evidence["shift"] == -1 and s.evidence["given_balanced_accuracy"] < 0.5
    assert "each item takes the label of the previous row" in s.message
    assert report.step("label-shuffle control").status == FAIL  # the given labels look like noise


def test_alignment_passes_on_correct_labels_in_any_order(tmp_path):
    for name, order in (("sorted", None), ("shuffled", np.random.default_rng(5).permutation(180))):
        s = doctor(build_store(tmp_path / f"{name}.h5", order=order), tmp_path / name).step("features and alignment")
        assert s.status == PASS, (name, s.message)
        assert s.evidence["shift_gain"] < 0.05
    # labels sorted with the items (label folders): shifted labels are almost the same, no gain
    design = sorted([(s, s % 3) for s in range(30) for _ in range(6)], key=lambda t: t[1])
    s = doctor(build_store(tmp_path / "bylabel.h5", design=design), tmp_path / "bylabel").step("features and alignment")
    assert s.status == PASS and s.evidence["shift_gain"] < 0.05


def test_alignment_without_shuffles_says_the_shift_was_not_tested(tmp_path):
    path = healthy(tmp_path / "r.h5", cue_strength=3.0)
    set_column(path, "label", np.roll(column(path, "label"), 1))
    s = doctor(path, tmp_path, n_permutations=0).step("features and alignment")
    assert s.status == PASS and "label shift not tested (no label shuffles requested)" in s.message


# ---------------------------------------------------------------------------------------------
# 5. label-shuffle control
# ---------------------------------------------------------------------------------------------
def test_shuffle_control_on_leaky_folds_warns(tmp_path):
    path = healthy(tmp_path / "g.h5", cue_strength=0.5, speaker_strength=2.0)
    set_column(path, "group", column(path, "id"))
    s = doctor(path, tmp_path).step("label-shuffle control")
    assert s.status == WARN and s.caused_by == "fold sanity"
    assert s.message.startswith("above shuffled labels, but on leaky folds")


def test_shuffle_control_without_permutations_is_skipped(tmp_path):
    s = doctor(healthy(tmp_path / "h.h5"), tmp_path, n_permutations=0).step("label-shuffle control")
    assert s.status == SKIP and s.message == "no permutations requested"


# ---------------------------------------------------------------------------------------------
# 6. padding and pooling (the measured comparison: tests/test_doctor_padded.py)
# ---------------------------------------------------------------------------------------------
def test_equal_frame_counts_for_different_lengths_fail(tmp_path):
    def item(rng, s, y, j):  # 10 frames each; the audio is 9 or 10 frames long (no excess to flag)
        x, _ = cue_item(rng, s, y, j, frames=(10, 10))
        return x, 320 * 9 + 80 + int(rng.integers(0, 640))

    report = doctor(build_store(tmp_path / "e.h5", item=item), tmp_path)
    assert_fails_at(report, "padding and pooling")
    s = report.step("padding and pooling")
    assert s.evidence["items_with_unexplained_frames"] == 0
    assert "every item has exactly 10 frames although clip lengths differ" in s.message


def test_padded_audio_of_equal_length_fails(tmp_path):
    pad = np.random.default_rng(9).normal(size=16)

    def item(rng, s, y, j):  # audio padded to 1 s before extraction: 49 true frames, constant tail
        x, _ = cue_item(rng, s, y, j, frames=(49, 49))
        x[:, 12:] = pad + 0.01 * rng.normal(size=(37, 16))
        x[1, 4:6] += 2.0 * np.random.default_rng(2000 + y).normal(size=16)
        return x, 16000

    report = doctor(build_store(tmp_path / "a.h5", item=item), tmp_path)
    assert_fails_at(report, "padding and pooling")
    s = report.step("padding and pooling")
    assert s.evidence["all_clips_same_length"] is True and s.evidence["edge_frame_spread_ratio"] < 0.25
    assert "all clips have the same length and the last frames are near-identical" in s.message


def test_silent_tails_warn(tmp_path):
    def item(rng, s, y, j):  # true frames, the last ones silent (near-identical across items)
        x, ns = cue_item(rng, s, y, j, frames=(8, 12))
        x[:, -2:] = 0.01 * rng.normal(size=(2, 16))
        return x, ns

    s = doctor(build_store(tmp_path / "t.h5", item=item), tmp_path).step("padding and pooling")
    assert s.status == WARN
    assert "the last frames are near-identical across items" in s.message and "silence or padding at that end" in s.message


def test_equal_sample_counts_warn(tmp_path):
    def item(rng, s, y, j):
        x, _ = cue_item(rng, s, y, j, frames=(10, 10))
        return x, 320 * 9 + 400

    s = doctor(build_store(tmp_path / "q.h5", item=item), tmp_path).step("padding and pooling")
    assert s.status == WARN
    assert "every clip has the same number of samples: was the audio padded or cut" in s.message


def test_store_not_padding_exact_warns_with_its_recipe(tmp_path):
    path = healthy(tmp_path / "p.h5")
    with h5py.File(path, "a") as f:
        f.attrs["padding_exact"] = False
        f.attrs["padding_recipe"] = json.dumps({"pad_seconds": 1.0, "keep_padding": True})
    s = doctor(path, tmp_path).step("padding and pooling")
    assert s.status == WARN
    assert s.message.startswith("this store is not padding-exact (recipe: pad or cut to 1.0 s, padded frames kept)")
    assert s.evidence["padding_recipe"] == {"pad_seconds": 1.0, "keep_padding": True}


def test_exact_store_quotes_the_audit_without_warning(tmp_path):
    path = healthy(tmp_path / "x.h5")
    with h5py.File(path, "a") as f:
        f.attrs["padding_audit"] = json.dumps({"clips": 8, "pad_seconds": 1.0, "max_abs": [0.1, 2.5, 1.0, 0.4],
                                               "mean_abs": [0.01, 0.3, 0.2, 0.05]})
    s = doctor(path, tmp_path).step("padding and pooling")
    assert s.status == PASS
    assert ("padding inside the model moves frames by up to 2.50 (layer 1; 8 clips padded to 1.0 s, extraction's "
            "audit); this store is padding-exact, so that is what a padded pipeline would compute") in s.message


def test_whisper_window_audit_is_quoted_as_a_window_not_as_padding(tmp_path):
    path = healthy(tmp_path / "w.h5")
    with h5py.File(path, "a") as f:
        f.attrs["padding_audit"] = json.dumps({"reference": "full-30s", "context_seconds": 2.0, "clips": 8,
                                               "frames": 200, "max_abs": [0.0, 0.7, 1.9, 0.4],
                                               "mean_abs": [0.0, 0.1, 0.2, 0.05]})
    s = doctor(path, tmp_path).step("padding and pooling")
    assert s.status == PASS
    assert ("the 2-s context window moves frames by up to 1.90 against Whisper's full 30-s window (layer 2; 8 "
            "clips, extraction's audit); the store's frames are the 2-s window's, each clip's own") in s.message
    assert "padding inside the model" not in s.message
    assert s.evidence["audit_context_seconds"] == 2.0


def test_simulated_padding_winning_by_duration_warns(tmp_path):
    def item(rng, s, y, j):  # label sets the length; frames are noise + a speaker offset
        t = int(rng.integers(*[(4, 7), (10, 14), (20, 26)][y]))
        off = np.random.default_rng(100 + s).normal(size=(3, 1, 16))
        return rng.normal(size=(3, t, 16)) + off, 320 * t + 80

    report = doctor(build_store(tmp_path / "d.h5", item=item), tmp_path)
    s = report.step("padding and pooling")
    assert s.status == WARN and s.caused_by == "confounds"
    assert s.evidence["padded_source"] == "simulated" and s.evidence["padded_minus_true"] >= 0.05
    assert s.message.startswith("simulated padded pooling scores +0.10 higher only because it encodes clip duration")
    assert "simulated padding to 49 frames (the mean diluted by zeros; no model run)" in s.message


def test_collapse_fails_padding_and_imbalance(tmp_path):
    # no label cue, 80 % of the speakers in one class: logistic regression predicts that class
    path = healthy(tmp_path / "c.h5", cue_strength=0.0, class_probs=(0.8, 0.1, 0.1), n_speakers=40, seed=3)
    report = doctor(path, tmp_path)
    s = report.step("padding and pooling")
    assert s.status == FAIL and "true pooling collapses: it predicts 'Normal' for 94 % of the items" in s.message
    s = report.step("class imbalance")
    assert s.status == FAIL and "is almost never recognised" in s.message
    assert min(s.evidence["recall"]["none"].values()) < 0.1


# ---------------------------------------------------------------------------------------------
# 7. layer profile
# ---------------------------------------------------------------------------------------------
def test_flat_layer_profile_warns(tmp_path):
    path = healthy(tmp_path / "f.h5", informative_layers=(0, 1, 2, 3), cue_strength=6.0)
    s = doctor(path, tmp_path).step("layer profile")
    assert s.status == WARN and "the curve is flat" in s.message
    assert max(s.evidence["range_over_layers"].values()) < 0.03


def test_layer_profile_after_a_failed_shuffle_control_warns(tmp_path):
    path = healthy(tmp_path / "s.h5")
    labels, groups = column(path, "label"), column(path, "group")
    spk = sorted(set(groups))
    lab = {g: labels[groups == g][0] for g in spk}
    perm = np.random.default_rng(3).permutation(spk)
    set_column(path, "label", [lab[perm[spk.index(g)]] for g in groups])
    s = doctor(path, tmp_path).step("layer profile")
    assert s.status == WARN and s.caused_by == "label-shuffle control"
    assert s.advice.startswith("no layer beats shuffled labels")


# ---------------------------------------------------------------------------------------------
# 8. class imbalance
# ---------------------------------------------------------------------------------------------
def test_neglected_rare_class_warns(tmp_path):
    # a weak cue, 85 % of the speakers in one class (seed 0: 5 speakers per rare class)
    path = healthy(tmp_path / "i.h5", cue_strength=1.0, class_probs=(0.85, 0.075, 0.075), n_speakers=60, seed=0)
    s = doctor(path, tmp_path).step("class imbalance")
    assert s.status == WARN, s.message
    assert min(s.evidence["recall"]["none"].values()) < 0.3
    assert min(s.evidence["recall"]["balanced"].values()) - min(s.evidence["recall"]["none"].values()) >= 0.15
    assert s.advice == "use --class-weight balanced (or sampling)"
