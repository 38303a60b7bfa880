# cache.py: what the training stages keep from the frozen networks. Here: the targets' clean-up (loops cut,
# refusals and empty targets dropped and counted), on hand-written records.
import cache


def test_trim_repeats_cuts_at_the_first_repeated_sentence():
    looped = "I'm sorry for your loss. I'm sure you're not alone. I'm sure you're not alone. I'm sure"
    assert cache.trim_repeats(looped) == ("I'm sorry for your loss. I'm sure you're not alone.", True)
    # case and the kind of ending do not hide a repeat; new sentences are kept whole
    assert cache.trim_repeats("Great news! great news! Really.") == ("Great news!", True)
    assert cache.trim_repeats("Hello there! How are you? Fine.") == ("Hello there! How are you? Fine.", False)


def test_training_items_cut_loops_and_count_what_they_drop(capsys):
    rows = [dict(text=f"s{i}", target_key=f"k{i}") for i in range(4)]
    targets = {"k0": dict(target="A. B. A. B.", truncated=True, refusal=False),
               "k1": dict(target="Fine.", truncated=True, refusal=False),
               "k2": dict(target="I'm sorry, but I cannot do that.", truncated=False, refusal=True),
               "k3": dict(target="", truncated=False, refusal=False)}
    items = cache.training_items(rows, targets, lambda row, t: dict(seen=(t["target"], t["truncated"])), 1, "m.jsonl")
    # a cut loop ends where it is cut (not truncated: the model learns to stop); an uncut one keeps its flag
    assert [it["seen"] for it in items] == [("A. B.", False), ("Fine.", True)]
    assert [it["target"] for it in items] == ["A. B.", "Fine."]
    out = capsys.readouterr().out
    assert "2 items (1 targets cut" in out and "'unreadable audio': 1, 'refusal': 1, 'empty target': 1" in out
