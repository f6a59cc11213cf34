"""Verification maths: which drafted tokens the target accepts, and the token it adds after them.

Greedy (temperature 0): accept while the draft equals the target's argmax; the next token is the target's argmax
after the last accepted one (the "bonus"). The output is exactly greedy decoding.

Sampling (Leviathan et al. / Chen et al.), p the target's and q the drafter's distribution at a position:
    chain: accept a drafted x ~ q with probability min(1, p(x) / q(x)); at the first rejection sample from
           norm(max(0, p − q)); when all are accepted sample the bonus from p.
    tree:  children are proposed deterministically (top-k), so q is one-hot per child: try the siblings in order,
           accepting x with probability p(x); on a rejection set p(x) = 0 and renormalise; when every sibling is
           rejected sample from what is left of p.
    sampled tree (Multi-Candidate SD, SpecInfer's multi-step speculative sampling): a node's children come from
           x_1 … x_m drawn i.i.d. from q; check them in draw order, accepting x_i with probability
           min(1, r_i(x_i) / q(x_i)) where r_1 = p and r_{i+1} = norm(max(0, r_i − q)) after each rejection; when all
           are rejected sample from r_{m+1}. A rejected x has r(x) ≤ q(x), so r_{i+1}(x) = 0: a repeated draw is
           always rejected, and one child per distinct token suffices. Drawn without replacement instead (x_i from q
           without x_1 … x_{i−1}, renormalised: q_i), the same holds with q_i in place of q (Jeon et al. 2024).
    traversal (Traversal Verification, Weng et al. 2025, arXiv 2505.12398; on a chain it is Block Verification, Sun et
           al. 2024): verify leaves first, with a path-level weight w instead of a token-level test. With w_root = 1 and
           q_j the distribution a node's j-th child x_j was drawn from given its earlier siblings (one-hot for a
           deterministic top-k child; q minus the earlier siblings, renormalised, for draws without replacement):
               w_child = min(1, w · p(x_j) / q_j(x_j))
           Take the first leaf in depth-first order (children in draw order); accept its whole path with probability w
           and sample the bonus from its p. On a rejection delete it and update its parent:
               p ← norm(max(0, w·p − q_j)),  w ← s / (s + 1 − w) with s = Σ max(0, w·p − q_j)
           so a parent whose children are all deleted becomes a leaf tested with the block-level weight; the root is
           always accepted. A child's subtree is tried before its later siblings, so a path whose first token the
           top-down test would reject can still be kept.
All of them leave the output distributed exactly as sampling from the target.
"""

from __future__ import annotations

import torch


def target_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / T), restricted to the smallest top set of mass ≥ top_p and renormalised."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # keeps the first token always
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def accept_chain_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """draft_tokens [γ], target_logits [γ+1, V] → (accepted count, next token)."""
    wanted = target_logits.argmax(dim=-1)
    matches = (draft_tokens == wanted[:-1]).int()
    accepted = int(matches.cumprod(dim=0).sum())  # the one host sync of the step
    return accepted, int(wanted[accepted])


def accept_chain_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """draft_tokens [γ] sampled from draft_probs [γ, V]; probs [γ+1, V] the target's → (accepted, next token)."""
    gamma = len(draft_tokens)
    positions = torch.arange(gamma, device=probs.device)
    p_draft, q_draft = probs[positions, draft_tokens], draft_probs[positions, draft_tokens]
    uniform = torch.rand(gamma, generator=generator, device=probs.device)
    # u < p/q without dividing (q(x) > 0: x was drawn from q). Strict, as in the tree path: u is drawn from [0, 1),
    # so with `<=` a draw of exactly 0 would accept a token the target gives probability 0.
    accepted_flags = (uniform * q_draft < p_draft).int()
    accepted = int(accepted_flags.cumprod(dim=0).sum())
    if accepted == gamma:
        return accepted, int(sample(probs[gamma], generator))
    return accepted, int(sample(residual_distribution(probs[accepted], draft_probs[accepted]), generator))


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)): what to sample from after the target rejects a token drafted from q.

    An all-zero residual means p ≤ q everywhere, and as both sum to 1, p == q: a rejection then has probability 0
    (it happens only through float rounding, e.g. p an ulp below q everywhere), and the residual would be 0 / 0.
    The residual exists to make the output ~ p, and with p == q sampling from p itself does exactly that."""
    residual = (p - q).clamp_min(0.0)
    total = residual.sum()
    # torch.where, not `if`: no host sync; the clamp only keeps the unused branch free of 0 / 0.
    return torch.where(total > 0, residual / total.clamp_min(torch.finfo(residual.dtype).tiny), p)


def accept_tree_greedy(tokens: list[int], children: list[list[int]], wanted: list[int]) -> tuple[list[int], int]:
    """Rows are 0 = root, then the tree's nodes; `children[row]` lists child rows, `wanted[row]` the target's argmax
    after that row. → (accepted rows, root to leaf; next token)."""
    row, path = 0, []
    while True:
        match = next((child for child in children[row] if tokens[child] == wanted[row]), None)
        if match is None:
            return path, wanted[row]
        path.append(match)
        row = match


def accept_tree_sampling(
    tokens: list[int], children: list[list[int]], probs: torch.Tensor, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """Recursive rejection over siblings (module doc); probs [rows, V] the target's distribution after each row."""
    row, path = 0, []
    while True:
        residual = probs[row]
        for child in children[row]:
            token = tokens[child]
            if float(torch.rand((), generator=generator, device=probs.device)) < float(residual[token]):
                path.append(child)
                row = child
                break
            residual = residual.clone()
            residual[token] = 0.0
            residual = residual / residual.sum().clamp_min(torch.finfo(residual.dtype).tiny)
        else:  # every sibling rejected; nothing left of p happens only through float rounding (as in the chain)
            return path, int(sample(residual if float(residual.sum()) > 0 else probs[row], generator))


def accept_tree_multi_candidate(
    tokens: list[int], children: list[list[int]], draws: list[list[int]], draft_probs: dict[int, torch.Tensor],
    probs: torch.Tensor, generator: torch.Generator | None, without_replacement: bool = False,
) -> tuple[list[int], int]:
    """Recursive rejection over each row's draws (module doc); `draws[row]` the tokens drawn at that row in order,
    `draft_probs[row]` the q they came from (i.i.d., or `without_replacement`), probs [rows, V] the target's
    distribution after each row."""
    row, path = 0, []
    while True:
        residual = probs[row]
        child_of = {tokens[child]: child for child in children[row]}
        q = draft_probs.get(row)  # None where nothing was drawn
        for token in draws[row]:
            # u < r(x) / q(x) without dividing (q(x) > 0: x was drawn from q)
            if float(torch.rand((), generator=generator, device=probs.device)) * float(q[token]) < float(residual[token]):
                path.append(child_of[token])
                row = child_of[token]
                break
            residual = residual_distribution(residual, q)
            if without_replacement:  # the next draw came from q without this one
                q = without_draw(q, token)
        else:
            return path, int(sample(residual, generator))


def without_replacement(probs: torch.Tensor, count: int, generator: torch.Generator | None) -> list[int]:
    """`count` distinct tokens drawn one after another from probs, each from what is left of it renormalised (at most
    as many as probs has non-zero entries), in draw order: the exponential race, token x arriving at E_x / probs(x)
    with E_x ~ Exp(1), whose arrival order is exactly that sequential draw (Gumbel-top-k)."""
    count = min(count, int((probs > 0).sum()))
    arrival = torch.empty_like(probs).exponential_(generator=generator) / probs  # probs(x) = 0: never arrives
    return arrival.topk(count, largest=False).indices.tolist()


def path_weight(parent_weight: float, p_token: float, q_token: float) -> float:
    """Traversal: a child's weight, min(1, w · p(x) / q_j(x)) (q_j(x) > 0: x was drawn from q_j)."""
    return min(1.0, parent_weight * p_token / q_token)


def block_residual(
    weight: float, p: torch.Tensor, drawn_from: torch.Tensor, outside: float = 0.0
) -> tuple[float, torch.Tensor, float]:
    """Traversal: a row's (weight, p) after its child drawn from `drawn_from` is deleted: s = Σ max(0, w·p − q_j),
    w ← s / (s + 1 − w), p ← max(0, w·p − q_j) / s. `p` and `drawn_from` may cover only the tokens q_j can give,
    `outside` being p's mass on the others: there the residual is w·p, so that mass becomes w·outside / s and its shape
    stays p's. s = 0 (w·p ≤ q_j everywhere) gives weight 0; p is then kept, as residual_distribution keeps it.
    Returns (weight, p, outside)."""
    residual = (weight * p - drawn_from).clamp_min(0.0)
    mass = float(residual.sum()) + weight * outside
    if mass <= 0:
        return 0.0, p, outside
    return mass / (mass + 1.0 - weight), residual / mass, weight * outside / mass


def without_draw(q: torch.Tensor, token: int) -> torch.Tensor:
    """What the next draw without replacement comes from: q with `token` removed, renormalised."""
    q = q.index_fill(0, torch.tensor([token], device=q.device), 0.0)
    return q / q.sum().clamp_min(torch.finfo(q.dtype).tiny)


def accept_tree_traversal(
    tokens: list[int], children: list[list[int]], probs: torch.Tensor, draft_probs: dict[int, torch.Tensor],
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """Traversal verification (module doc). `children[row]` in draw order; `draft_probs[row]` the q that row's
    children were drawn from without replacement, a row absent from it has deterministic children (q_j one-hot);
    probs [rows, V] the target's distribution after each row.

    A row with top-k children keeps its residual on their k tokens plus one number, p's mass on the rest
    (block_residual): a deleted child costs O(k) instead of O(V), and the full residual is built only to sample a
    bonus from it."""

    def kept(row: int, weight: float) -> bool:
        return row == 0 or float(torch.rand((), generator=generator, device=probs.device)) < weight  # root: always

    def visit(row: int, weight: float) -> tuple[list[int], int] | None:
        """Verify row's subtree, row holding path weight `weight` → (accepted rows below row, bonus), or None when row
        itself is deleted. Depth-first in draw order, so the first leaf is always tried first."""
        p_row, q, kids = probs[row], draft_probs.get(row), children[row]
        if not kids:
            return ([], int(sample(p_row, generator))) if kept(row, weight) else None
        if q is None:  # top-k children: the residual kept on their k tokens, p_row's mass on the rest as one number
            support = torch.tensor([tokens[child] for child in kids], device=probs.device)
            positions, p = range(len(kids)), p_row[support]
            outside = first_outside = max(0.0, 1.0 - float(p.sum()))
        else:  # drawn children: q covers (nearly) the vocabulary, so does the residual
            positions, p, outside = [tokens[child] for child in kids], p_row, 0.0
        for child, position in zip(kids, positions):
            accepted = visit(child, path_weight(weight, float(p[position]), 1.0 if q is None else float(q[position])))
            if accepted is not None:
                return [child, *accepted[0]], accepted[1]
            if q is None:  # a deterministic child: it was drawn from the one-hot at its token
                one_hot = torch.zeros_like(p).index_fill_(0, torch.tensor([position], device=p.device), 1.0)
                weight, p, outside = block_residual(weight, p, one_hot, outside)
            else:
                weight, p, outside = block_residual(weight, p, q, outside)
                q = without_draw(q, position)
        if not kept(row, weight):
            return None
        if q is None:  # every child deleted: the bonus comes from the residual, p_row's shape off the k tokens
            off_support = p_row * (outside / first_outside) if first_outside > 0 else torch.zeros_like(p_row)
            p = off_support.index_put((support,), p)
        return [], int(sample(p, generator))

    return visit(0, 1.0)
