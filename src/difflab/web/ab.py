"""Human A/B evaluation: experiments, image pairs, votes (SQLite) and the Bradley–Terry ranking.

Owns the database ``ab.sqlite`` (tables ``experiments``, ``pairs``, ``votes``; written in
autocommit mode with WAL, so a vote is on disk when the request answers), the random
left/right order of each pair, and ``bradley_terry``: the maximum a-posteriori strengths of
Bradley & Terry (1952), P(i beats j) = σ(θ_i - θ_j), fitted by Newton's method with a weak
Gaussian prior (so a configuration that never lost keeps a finite score), with standard errors
from the inverse Hessian.  A tie, and a "both bad" vote, count as half a win each way (the
usual reduction of ties, Rao & Kupper 1967 without their extra parameter).  Configurations
are identified across experiments by their canonical JSON, so the ranking pools every vote.
Knows nothing of HTTP or of sampling.
"""

from __future__ import annotations

import csv
import io
import json
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CHOICES", "ABStore", "bradley_terry", "config_key", "config_label"]

CHOICES = ("left", "right", "tie", "both_bad")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL,
    condition TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id TEXT PRIMARY KEY, experiment INTEGER NOT NULL REFERENCES experiments(id),
    seed INTEGER NOT NULL, condition TEXT NOT NULL, a_left INTEGER NOT NULL,
    image_a BLOB NOT NULL, image_b BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    pair TEXT PRIMARY KEY REFERENCES pairs(id), experiment INTEGER NOT NULL,
    winner TEXT NOT NULL, choice TEXT NOT NULL, created REAL NOT NULL);
"""


def config_key(config: Mapping[str, Any]) -> str:
    """The identity of a configuration: its settings as canonical JSON (the name excluded)."""
    return json.dumps({k: v for k, v in config.items() if k != "name"}, sort_keys=True)


def config_label(config: Mapping[str, Any]) -> str:
    """A display name: the given ``name`` or its settings as ``key=value`` pairs."""
    if config.get("name"):
        return str(config["name"])
    short = {"guidance_scale": "cfg", "guidance_rescale": "rescale"}
    parts = [f"{short.get(k, k)}={v}" for k, v in sorted(config.items())]
    return " ".join(parts) or "defaults"


def bradley_terry(
    wins: np.ndarray, *, prior: float = 0.01, iters: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Bradley–Terry log-strengths θ and their standard errors from ``wins[i, j]`` (the
    times i beat j; halves allowed for ties).

    Maximises Σ_ij w_ij log σ(θ_i - θ_j) - prior/2 · Σ_i θ_i² by Newton's method; with
    ``prior=0`` it is the maximum-likelihood fit with Σθ = 0 (two players: θ_0 - θ_1 =
    log(w_01 / w_10)).  Standard errors are the square roots of the diagonal of the inverse
    negative Hessian (with ``prior=0``, of its inverse on the Σθ = 0 plane).
    """
    w = np.asarray(wins, dtype=np.float64)
    k = w.shape[0]
    if w.ndim != 2 or w.shape != (k, k):
        raise ValueError(f"wins must be a square matrix, got shape {w.shape}")
    games = w + w.T
    theta = np.zeros(k)
    centre = np.full((k, k), 1.0 / k)  # fixes the free offset when prior = 0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # P(i beats j)
        grad = (w - games * p).sum(1) - prior * theta
        info = games * p * (1 - p)  # (K, K)
        neg_hess = np.diag(info.sum(1)) - info + prior * np.eye(k)
        step = np.linalg.solve(neg_hess + (centre if prior == 0 else 0), grad)
        theta = theta + step
        if prior == 0:
            theta -= theta.mean()
        if np.abs(step).max() < 1e-12:
            break
    p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))
    info = games * p * (1 - p)
    neg_hess = np.diag(info.sum(1)) - info + prior * np.eye(k)
    cov = np.linalg.pinv(neg_hess) if prior == 0 else np.linalg.inv(neg_hess)
    return theta, np.sqrt(np.clip(np.diag(cov), 0, None))


class ABStore:
    """Experiments, pairs and votes in ``path`` (an SQLite file, created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ experiments
    def add_experiment(
        self, name: str, a: Mapping[str, Any], b: Mapping[str, Any], condition: Mapping[str, Any]
    ) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO experiments (name, a, b, condition, created) VALUES (?, ?, ?, ?, ?)",
                (
                    name,
                    json.dumps(dict(a)),
                    json.dumps(dict(b)),
                    json.dumps(dict(condition)),
                    time.time(),
                ),
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def experiment(self, experiment_id: int) -> dict[str, Any]:
        rows = self._rows(
            "SELECT id, name, a, b, condition FROM experiments WHERE id = ?", (experiment_id,)
        )
        if not rows:
            raise KeyError(f"no A/B experiment {experiment_id}")
        return self._experiment(rows[0])

    def experiments(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT id, name, a, b, condition FROM experiments ORDER BY id DESC")
        out = [self._experiment(row) for row in rows]
        counts = dict(self._rows("SELECT experiment, COUNT(*) FROM votes GROUP BY experiment"))
        for e in out:
            e["votes"] = counts.get(e["id"], 0)
        return out

    @staticmethod
    def _experiment(row: tuple) -> dict[str, Any]:
        a, b = json.loads(row[2]), json.loads(row[3])
        return {
            "id": row[0],
            "name": row[1],
            "a": a,
            "b": b,
            "condition": json.loads(row[4]),
            "labels": [config_label(a), config_label(b)],
        }

    # ------------------------------------------------------------------ pairs and votes
    def add_pair(
        self,
        experiment_id: int,
        seed: int,
        condition: Mapping[str, Any],
        image_a: bytes,
        image_b: bytes,
    ) -> dict[str, Any]:
        """Store a pair, A on the left or right at random; ``{"id", "a_left"}``."""
        pair_id, a_left = secrets.token_hex(8), secrets.randbelow(2) == 1
        with self._lock:
            self._db.execute(
                "INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    pair_id,
                    experiment_id,
                    seed,
                    json.dumps(dict(condition)),
                    int(a_left),
                    image_a,
                    image_b,
                    time.time(),
                ),
            )
        return {"id": pair_id, "a_left": a_left}

    def pair_image(self, pair_id: str, side: str) -> bytes:
        """The PNG shown on ``side`` (``left`` / ``right``) of a pair."""
        rows = self._rows("SELECT a_left, image_a, image_b FROM pairs WHERE id = ?", (pair_id,))
        if not rows or side not in ("left", "right"):
            raise KeyError(f"no A/B pair image {pair_id!r}/{side!r}")
        a_left, image_a, image_b = rows[0]
        return image_a if bool(a_left) == (side == "left") else image_b

    def vote(self, pair_id: str, choice: str) -> dict[str, Any]:
        """Record the vote on a pair (one per pair); which configuration it favoured."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        rows = self._rows("SELECT experiment, a_left FROM pairs WHERE id = ?", (pair_id,))
        if not rows:
            raise KeyError(f"no A/B pair {pair_id!r}")
        experiment, a_left = rows[0]
        if choice in ("left", "right"):
            winner = "a" if bool(a_left) == (choice == "left") else "b"
        else:
            winner = choice
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO votes VALUES (?, ?, ?, ?, ?)",
                    (pair_id, experiment, winner, choice, time.time()),
                )
        except sqlite3.IntegrityError:
            raise FileExistsError(f"pair {pair_id!r} already has a vote") from None
        return {"pair": pair_id, "winner": winner}

    # ------------------------------------------------------------------ ranking
    def ranking(self, experiment_id: int | None = None, *, prior: float = 0.01) -> dict[str, Any]:
        """Every configuration with a vote: Bradley–Terry score (log-strength), its 95%
        interval, an Elo-scaled score, wins / losses / ties / both-bad and votes."""
        sql = "SELECT e.a, e.b, v.winner FROM votes v JOIN experiments e ON e.id = v.experiment" + (
            "" if experiment_id is None else " WHERE e.id = ?"
        )
        rows = self._rows(sql, () if experiment_id is None else (experiment_id,))
        keys: dict[str, int] = {}
        labels: list[str] = []
        tallies: list[dict[str, int]] = []
        for a, b, _ in rows:
            for text in (a, b):
                config = json.loads(text)
                key = config_key(config)
                if key not in keys:
                    keys[key] = len(keys)
                    labels.append(config_label(config))
                    tallies.append({"wins": 0, "losses": 0, "ties": 0, "both_bad": 0})
        wins = np.zeros((len(keys), len(keys)))
        for a, b, winner in rows:
            i, j = keys[config_key(json.loads(a))], keys[config_key(json.loads(b))]
            if i == j:
                continue  # the same settings on both sides: no information
            if winner in ("a", "b"):
                w, l = (i, j) if winner == "a" else (j, i)
                wins[w, l] += 1
                tallies[w]["wins"] += 1
                tallies[l]["losses"] += 1
            else:
                wins[i, j] += 0.5
                wins[j, i] += 0.5
                kind = "ties" if winner == "tie" else "both_bad"
                tallies[i][kind] += 1
                tallies[j][kind] += 1
        out = []
        if keys:
            theta, se = bradley_terry(wins, prior=prior)
            elo = 400.0 / math.log(10.0)
            for idx, key in enumerate(keys):
                t = float(theta[idx])
                ci = [t - 1.96 * float(se[idx]), t + 1.96 * float(se[idx])]
                out.append(
                    {
                        "config": json.loads(key),
                        "label": labels[idx],
                        "score": t,
                        "ci95": ci,
                        "elo": 1000 + elo * t,
                        "votes": sum(tallies[idx].values()),
                        **tallies[idx],
                    }
                )
            out.sort(key=lambda r: -r["score"])
            for rank, row in enumerate(out, 1):
                row["rank"] = rank
        return {
            "votes": len(rows),
            "prior": prior,
            "configs": out,
            "model": "Bradley-Terry, ties and both-bad as half a win each way",
        }

    def ranking_csv(self, experiment_id: int | None = None) -> str:
        ranking = self.ranking(experiment_id)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(
            [
                "rank",
                "label",
                "score",
                "ci95_lo",
                "ci95_hi",
                "elo",
                "wins",
                "losses",
                "ties",
                "both_bad",
                "votes",
                "config",
            ]
        )
        for r in ranking["configs"]:
            writer.writerow(
                [
                    r["rank"],
                    r["label"],
                    f"{r['score']:.6f}",
                    f"{r['ci95'][0]:.6f}",
                    f"{r['ci95'][1]:.6f}",
                    f"{r['elo']:.1f}",
                    r["wins"],
                    r["losses"],
                    r["ties"],
                    r["both_bad"],
                    r["votes"],
                    json.dumps(r["config"], sort_keys=True),
                ]
            )
        return buffer.getvalue()
