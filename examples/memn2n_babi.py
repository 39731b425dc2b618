"""MemN2N on generated bAbI-style question answering: single, two and three supporting facts.

Stories come from a small simulated world (people move between places, pick up and drop
objects), so nothing is downloaded. For each task a MemN2N is trained on its own stories
and its test accuracy printed.

    python examples/memn2n_babi.py [--train 2000] [--test 1000] [--epochs 40]
"""

import argparse
import random
import time

import torch
import torch.nn.functional as F

from attnmem.nn import MemN2N

PEOPLE = ["mary", "john", "sandra", "daniel"]
PLACES = ["bathroom", "hallway", "garden", "office", "kitchen", "bedroom"]
OBJECTS = ["football", "apple", "milk"]


def single_fact(rng, length):
    """'Where is <person>?' -> the place the person last moved to."""
    story, where = [], {}
    for _ in range(length):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        story.append(f"{person} {rng.choice(['moved', 'went', 'travelled'])} to the {place}")
        where[person] = place
    person = rng.choice(sorted(where))
    return story, f"where is {person}", where[person]


def _world(rng, length):
    """Moves, pick-ups and drops; returns the story and each object's place history."""
    story, at, holding, history = [], {}, {}, {o: [] for o in OBJECTS}
    while len(story) < length:
        person = rng.choice(PEOPLE)
        action = rng.random()
        carried = [o for o, h in holding.items() if h == person]
        if action < 0.6 or person not in at:
            place = rng.choice(PLACES)
            story.append(f"{person} went to the {place}")
            at[person] = place
            for o in carried:
                if not history[o] or history[o][-1] != place:
                    history[o].append(place)
        elif action < 0.8:
            free = [o for o in OBJECTS if o not in holding]
            if free:
                o = rng.choice(free)
                story.append(f"{person} picked up the {o}")
                holding[o] = person
                if not history[o] or history[o][-1] != at[person]:
                    history[o].append(at[person])
        elif carried:
            o = rng.choice(carried)
            story.append(f"{person} dropped the {o}")
            del holding[o]
    return story, history


def two_facts(rng, length):
    """'Where is the <object>?' -> where its carrier took it (or left it)."""
    while True:
        story, history = _world(rng, length)
        known = [o for o in OBJECTS if history[o]]
        if known:
            o = rng.choice(known)
            return story, f"where is the {o}", history[o][-1]


def three_facts(rng, length):
    """'Where was the <object> before the <place>?' -> the place it was in just before."""
    while True:
        story, history = _world(rng, length)
        moved = [o for o in OBJECTS if len(history[o]) >= 2]
        if moved:
            o = rng.choice(moved)
            i = rng.randrange(1, len(history[o]))
            return story, f"where was the {o} before the {history[o][i]}", history[o][i - 1]


TASKS = {"single supporting fact": (single_fact, 2, 10),
         "two supporting facts": (two_facts, 6, 20),
         "three supporting facts": (three_facts, 10, 30)}


def make_dataset(task, count, rng):
    fn, low, high = TASKS[task]
    return [fn(rng, rng.randint(low, high)) for _ in range(count)]


def vocabulary(examples):
    words = {w for story, q, a in examples for s in story + [q, a] for w in s.split()}
    return {w: i + 1 for i, w in enumerate(sorted(words))}  # 0 is padding


def tensorize(examples, vocab, memory_size, words):
    def ids(sentence):
        tokens = [vocab[w] for w in sentence.split()][:words]
        return tokens + [0] * (words - len(tokens))

    stories = torch.zeros(len(examples), memory_size, words, dtype=torch.long)
    for i, (story, _, _) in enumerate(examples):
        recent = story[-memory_size:][::-1]  # most recent first, as the paper orders memory
        stories[i, :len(recent)] = torch.tensor([ids(s) for s in recent])
    queries = torch.tensor([ids(q) for _, q, _ in examples])
    answers = torch.tensor([vocab[a] for _, _, a in examples])
    return stories, queries, answers


def train_task(task, args, rng):
    train = make_dataset(task, args.train, rng)
    test = make_dataset(task, args.test, rng)
    vocab = vocabulary(train + test)
    words = max(len(s.split()) for story, q, _ in train + test for s in story + [q])
    memory_size = max(len(story) for story, _, _ in train + test)
    train_t = tensorize(train, vocab, memory_size, words)
    test_t = tensorize(test, vocab, memory_size, words)
    model = MemN2N(len(vocab) + 1, embed_dim=args.dim, memory_size=memory_size, hops=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.linear_start = args.linear_start > 0
    for epoch in range(args.epochs):
        if epoch == args.linear_start:
            model.linear_start = False
        order = torch.randperm(args.train)
        model.train()
        for start in range(0, args.train, args.batch):
            idx = order[start:start + args.batch]
            loss = F.cross_entropy(model(train_t[0][idx], train_t[1][idx]), train_t[2][idx])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 40.0)
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_t[0], test_t[1]).argmax(-1) == test_t[2]).float().mean().item()
    return accuracy, loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--linear-start", type=int, default=10,
                        help="epochs trained without the softmax (0: none)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    print(f"MemN2N, 3 hops, d={args.dim}: {args.train} training and {args.test} test stories "
          f"per task, {args.epochs} epochs ({args.linear_start} with linear start)")
    for task in TASKS:
        start = time.time()
        accuracy, loss = train_task(task, args, rng)
        print(f"  {task:<24} test accuracy {100 * accuracy:5.1f}%   "
              f"(last batch loss {loss:.3f}, {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
