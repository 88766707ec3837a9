"""Batched decoding that prefills shared prompt prefixes once and drops finished rows, so no compute is
spent on them (HF generate prefills every prompt whole and keeps finished rows).

`generate_batch` prefills a batch, then runs a KV-cached decode loop in which a row that emits the
end-of-sequence token (or reaches max_new_tokens) is removed from the batch: its slot in the cache, the
attention mask and the positions is filled by a row from the end of the batch. When the rows that
remain all share some leading padding, those columns are cut from the cache and the mask as well.

Shared prefixes. In STaR-GATE most of a prompt is shared: every Questioner prompt starts with the same
instructions and worked example, and the N conversations of a pair share the persona and task. A turn
generates 10-60 tokens after a 250-400 token prompt, so the prefill is most of the work. `plan_prefill`
splits each prompt into three segments: the root (tokens every prompt starts with), its group's part
(tokens it shares with the other prompts of its group) and its own rest. The prefill runs one forward
pass per level, each on a left-padded batch: the root once, each group's part once, each rest once.
Before a level, each of its rows gets a copy of its parent's cache row. A row's attention mask then has
padding zeros between its segments, and its positions count its real tokens only (the mask's cumsum,
minus one), so it attends to the keys, at the positions, that it would have alone:

    row   root (1 row)   groups (2 rows)   rests (3 rows)      mask (1 = real token)
    0     S S S S        _ _ p p p         _ _ a a             1111 00111 0011
    1     S S S S        _ _ p p p         b b b b             1111 00111 1111
    2     S S S S        q q q q q         _ _ _ c             1111 11111 0001

Greedy decoding (temperature == 0) reproduces HF `model.generate(do_sample=False)` token for token
up to floating-point noise: a row in a padded batch can drift from the same row generated alone, as it
does with HF's own batched generate, because the matmuls see different shapes (see bench/decode_bench.py).

Sampling (temperature > 0) applies temperature, then top-p (nucleus) filtering as HF's
TopPLogitsWarper does (keep the smallest set of tokens whose probability reaches top_p, at least one),
and draws one token per row with torch.multinomial from the given generator. As with HF's batched
sampling, which numbers a row receives depends on the batch composition (its place among the rows
still running, in the order they were given), so a prompt's sample depends on what it was batched
with; runs with the same batches, seed and thread count are reproducible.
"""

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _forward_names(model):
    """Keyword names the underlying causal LM accepts for the cache and for last-position-only logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel -> the LM
    params = inspect.signature(base.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.x renamed it
    logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return base, cache_kw, logits_kw


def _pick(logits, temperature, top_p, generator, head_sizes=(256, 4096)):
    """Next token per row from last-position logits [n, vocab].

    Top-p keeps, in order of decreasing probability, every token whose preceding mass is < top_p (the
    smallest head of the distribution reaching top_p, at least one token): the set transformers'
    TopPLogitsWarper keeps, up to float rounding at the boundary. Sorting the whole vocabulary costs
    ~4-7 ms per row on one CPU core, as much as a good part of the model's forward pass per row, so each
    row's nucleus is looked for among its top 256 tokens (~0.2 ms), then its top 4096, and the full
    sort is left to rows whose distribution is flatter than that.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    todo = torch.arange(probs.shape[0], device=probs.device)  # rows still to sample
    vocab = probs.shape[-1]
    for k in [k for k in head_sizes if k < vocab] + [vocab]:
        if k < vocab:
            head, index = probs[todo].topk(k, dim=-1)  # sorted, most likely first
            done = head.sum(-1) >= top_p  # the nucleus lies inside this head
        else:
            head, index = probs[todo].sort(dim=-1, descending=True)
            done = torch.ones(len(todo), dtype=torch.bool, device=probs.device)
        if done.any():
            head, index = head[done], index[done]
            before = head.cumsum(-1) - head  # mass of the more likely tokens; 0 for the first
            weights = head.masked_fill(before >= top_p, 0.0)
            choice = torch.multinomial(weights, 1, generator=generator)  # weights need not sum to 1
            tokens[todo[done]] = index.gather(1, choice)[:, 0]
            todo = todo[~done]
        if len(todo) == 0:
            break
    return tokens


class _BufferLayer(DynamicLayer):
    """A full-attention cache layer that writes into a preallocated buffer instead of concatenating.

    DynamicLayer.update copies the whole layer cache every step (torch.cat), ~10% of a decode step here.
    This layer allocates room for `capacity` positions at its first update (the whole prompt and every
    new token) and exposes `keys`/`values` as views [:, :, start:end] of the buffer, so a step writes one
    position. Dropping finished rows copies only the rows that move into their slots (_fill_holes);
    other selections (copying a shared prefix to the rows that share it) index-select the buffer, one
    copy as DynamicLayer does. Cutting leading padding moves `start`.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.start, self.end = capacity, 0, 0

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
            shape = (*key_states.shape[:2], max(new, self.capacity), key_states.shape[-1])
            self.key_buffer = key_states.new_empty(shape)
            self.value_buffer = value_states.new_empty(shape)
        elif self.end + new > self.key_buffer.shape[-2]:  # out of room: double the buffer
            grow = max(new, self.key_buffer.shape[-2])
            self.key_buffer = torch.cat([self.key_buffer, self.key_buffer.new_empty(
                (*self.key_buffer.shape[:2], grow, self.key_buffer.shape[-1]))], dim=-2)
            self.value_buffer = torch.cat([self.value_buffer, self.value_buffer.new_empty(
                (*self.value_buffer.shape[:2], grow, self.value_buffer.shape[-1]))], dim=-2)
        self.key_buffer[:, :, self.end:self.end + new] = key_states
        self.value_buffer[:, :, self.end:self.end + new] = value_states
        self.end += new
        self._views()
        return self.keys, self.values

    def _views(self):
        self.keys = self.key_buffer[:, :, self.start:self.end]
        self.values = self.value_buffer[:, :, self.start:self.end]

    def batch_select_indices(self, indices):
        if not self.is_initialized:
            return
        m = len(indices)
        moved = (indices != torch.arange(m, device=indices.device)).nonzero()[:, 0]
        if m <= self.key_buffer.shape[0] and bool((indices[moved] >= m).all()):
            # Rows in the first m slots stay; rows from beyond them fill the holes: copy only those.
            source = indices[moved]
            self.key_buffer[moved] = self.key_buffer[source]
            self.value_buffer[moved] = self.value_buffer[source]
            self.key_buffer, self.value_buffer = self.key_buffer[:m], self.value_buffer[:m]
        else:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self._views()

    def drop_leading(self, positions: int):
        self.start += positions
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("generate_batch's cache layer is not croppable")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("generate_batch's cache layer cannot repeat rows")


def _full_attention_only(config) -> bool:
    """Whether every layer of the model's cache is a plain full-attention layer (no sliding window)."""
    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _new_cache(config, capacity: int):
    """A DynamicCache; its layers preallocated (_BufferLayer) when all are plain full-attention layers."""
    cache = DynamicCache(config=config)
    if _full_attention_only(config):
        cache.layers = [_BufferLayer(capacity) for _ in cache.layers]
    return cache


def _trim_leading_padding(cache, mask):
    """Cut the mask columns (and cache positions) that are padding for every remaining row.

    Only done with _BufferLayer layers; sliding-window or other layer types keep their own bookkeeping.
    """
    if not all(isinstance(layer, _BufferLayer) and layer.is_initialized for layer in cache.layers):
        return mask
    first_real = int(mask.argmax(-1).min())  # leading zeros of the least padded row (mask holds 0/1)
    if first_real == 0:
        return mask
    for layer in cache.layers:
        layer.drop_leading(first_real)
    return mask[:, first_real:]


# --- Shared prefixes ----------------------------------------------------------------------------------

def _shared_length(a: list[int], b: list[int]) -> int:
    """Number of leading tokens a and b have in common."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass
class PrefillPlan:
    """Each prompt split as root + its group's part + its own rest (see the module docstring).

    root:   tokens every prompt starts with (empty when they share fewer than min_shared)
    groups: per group, the tokens after the root that its prompts share (a group of one: all its
            prompt but the last token)
    group:  per prompt, the index of its group
    rests:  per prompt, the tokens after its group's part (never empty: its last token yields the logits)
    """
    root: list[int]
    groups: list[list[int]]
    group: list[int]
    rests: list[list[int]]

    @property
    def width(self) -> int:
        """Columns of the prefilled cache: each level is as wide as its longest segment."""
        return len(self.root) + max(map(len, self.groups)) + max(map(len, self.rests))

    @property
    def positions(self) -> int:
        """Positions the prefill computes, padding included: per level, rows x its longest segment."""
        return (len(self.root) + len(self.groups) * max(map(len, self.groups))
                + len(self.rests) * max(map(len, self.rests)))


def plan_prefill(prompt_ids: list[list[int]], min_shared: int = 8) -> PrefillPlan:
    """Split the prompts into a root and groups that share at least min_shared more tokens.

    Sorted by their tokens, prompts that share a prefix are neighbours; the sorted list is cut into runs
    (the groups) so as to save the most tokens: a group of k prompts that share s tokens after the root
    saves (k - 1) x s. When nothing is shared (or min_shared <= 0), or when padding would make the plan
    compute more positions than one plain left-padded batch, the plan is that batch: the whole prompts
    as rests.
    """
    n = len(prompt_ids)
    plain = PrefillPlan([], [[]], [0] * n, [list(p) for p in prompt_ids])
    if min_shared <= 0 or n == 1:
        return plain
    limits = [len(p) - 1 for p in prompt_ids]  # the most a prompt can share: its last token stays its own
    root = min([*limits, *(_shared_length(prompt_ids[0], p) for p in prompt_ids[1:])])
    root = root if root >= min_shared else 0
    order = sorted(range(n), key=lambda i: prompt_ids[i][root:])
    after = [min(_shared_length(prompt_ids[a], prompt_ids[b]), limits[a], limits[b]) - root
             for a, b in zip(order, order[1:])]  # what each sorted prompt shares with the next, after the root
    # saved[j]: the most the first j sorted prompts can save; start[j]: where their last group begins.
    saved, start = [0] * (n + 1), [0] * (n + 1)
    for j in range(1, n + 1):
        saved[j], start[j] = saved[j - 1], j - 1  # the j-th prompt in a group of its own
        shared = limits[order[j - 1]] - root
        for i in range(j - 2, -1, -1):  # the group order[i:j]
            shared = min(shared, after[i])
            if shared < min_shared:
                break
            if saved[i] + (j - i - 1) * shared > saved[j]:
                saved[j], start[j] = saved[i] + (j - i - 1) * shared, i
    if root == 0 and saved[n] == 0:
        return plain
    runs, j = [], n
    while j > 0:
        runs.append(order[start[j]:j])
        j = start[j]
    group, groups = [0] * n, []
    for g, run in enumerate(reversed(runs)):
        first = prompt_ids[run[0]]
        length = min(min(limits[i], _shared_length(first, prompt_ids[i])) for i in run)
        groups.append(first[root:length])
        for i in run:
            group[i] = g
    rests = [p[root + len(groups[group[i]]):] for i, p in enumerate(prompt_ids)]
    plan = PrefillPlan(list(prompt_ids[0][:root]), groups, group, rests)
    return plan if plan.positions < plain.positions else plain


def allocated_width(prompt_ids: list[list[int]], tails: list[int], min_shared: int = 8) -> int:
    """Positions per row of the KV cache that generate_batch (tails: max_new_tokens each) or score_batch (tails:
    each response's length) allocates for these prompts: the prefill plan's width, each row's tail after its
    rest. Sharing prefixes can make it wider than the longest prompt plus tail (a long shared part in one group,
    a long rest in another). For a model that shares no prefixes (_plan) it is an upper bound."""
    plan = plan_prefill(prompt_ids, min_shared)
    return len(plan.root) + max(map(len, plan.groups)) + max(len(r) + t for r, t in zip(plan.rests, tails))


def _plan(base, prompt_ids, min_shared: int) -> PrefillPlan:
    """plan_prefill for this model: padding between segments would shift a sliding window, so models whose
    cache is not plain full attention prefill one plain batch."""
    return plan_prefill(prompt_ids, min_shared if _full_attention_only(base.config) else 0)


def _left_pad(segments: list[list[int]], pad_token_id: int, device):
    """Token ids and 0/1 mask of token lists padded on the left to the longest."""
    width = max(map(len, segments))
    ids = torch.tensor([[pad_token_id] * (width - len(s)) + s for s in segments], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in segments], device=device)
    return ids, mask


def _prefill(decoder, last, cache_kw, cache, plan: PrefillPlan, pad_token_id: int, device):
    """Run the plan's three levels (root, groups, rests) into `cache`; returns (output of the last
    level's forward, mask). The root and the groups only fill the cache, so they run `decoder` (the LM
    without its head); the rests run `last`: the model for generation (logits at the last position), the
    decoder for scoring (hidden states at every position).

    Before a level, each of its rows takes a copy of its parent's cache row (and mask row). A level whose
    segments are all empty is skipped. Positions are the row's count of real tokens so far, so a row gets
    the positions it would get alone, whatever padding lies between its segments.
    """
    levels = [([plan.root], None, decoder),
              (plan.groups, [0] * len(plan.groups), decoder),
              (plan.rests, plan.group, last)]
    mask = torch.ones(1, 0, dtype=torch.long, device=device)
    for segments, parent, forward in levels:
        if parent is not None:
            index = torch.tensor(parent, device=device)
            mask = mask[index]
            if mask.shape[-1] > 0:  # something is cached already: each row copies its parent's
                cache.batch_select_indices(index)
        if not any(segments):
            continue
        ids, block = _left_pad(segments, pad_token_id, device)
        mask = torch.cat([mask, block], dim=-1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]  # padding: 0, never attended
        out = forward(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                      **{cache_kw: cache})
    return out, mask


def _fill_holes(keep: list[int]) -> list[int]:
    """New slot order of a batch from which rows were dropped (keep: the slots that stay, ascending).

    A row in the first len(keep) slots keeps its slot; the rows beyond fill the holes, so the cache
    copies only the rows that move (_BufferLayer.batch_select_indices).
    """
    m = len(keep)
    holes = sorted(set(range(m)) - set(keep))
    index = list(range(m))
    for hole, row in zip(holes, [j for j in keep if j >= m]):
        index[hole] = row
    return index


def generate_batch(model, prompt_ids: list[list[int]], max_new_tokens: int, eos_token_id, pad_token_id: int,
                   temperature: float = 0.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None, min_shared: int = 8) -> list[list[int]]:
    """Generate continuations of token-id prompts; returns per row the new ids, up to and excluding eos.

    model: a causal LM (transformers PreTrainedModel, or a peft PeftModel wrapping one), in eval mode.
    eos_token_id: an int, or a collection of ints any of which ends a row.
    temperature == 0: greedy. Otherwise temperature + top-p sampling drawn from `generator` (a
    torch.Generator on the model's device, or None for torch's global generator); a row's sample
    depends on its batch (see the module docstring). The caller chooses the batch (LocalLM.generate
    batches prompts that share a prefix together, longest first, so that little padding is computed).
    min_shared: prompt prefixes shared by at least this many tokens are prefilled once (plan_prefill);
    0 turns that off. Models whose cache is not plain full attention (e.g. sliding windows) never share.
    """
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate_batch: every prompt needs at least one token")
    outputs = [[] for _ in prompt_ids]
    if max_new_tokens <= 0:
        return outputs
    eos = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}

    base, cache_kw, logits_kw = _forward_names(model)
    device = next(model.parameters()).device
    # Logits at the last position only, asked for by an index tensor rather than the int 1: for an int,
    # transformers multiplies the strided slice hidden[:, -1:] by the head, and torch does that for a
    # frozen head (as under peft) with a batched matmul that first copies the head once per row.
    last_position = torch.tensor([-1], device=device) if logits_kw == "logits_to_keep" else 1
    forward = functools.partial(model, **({logits_kw: last_position} if logits_kw else {}))

    with torch.inference_mode():
        plan = _plan(base, prompt_ids, min_shared)
        cache = _new_cache(base.config, plan.width + max_new_tokens)
        out, mask = _prefill(base.get_decoder(), forward, cache_kw, cache, plan, pad_token_id, device)
        logits = out.logits[:, -1, :]
        next_position = mask.sum(-1, keepdim=True)  # [n, 1]: position of the token fed next
        rows = list(range(len(prompt_ids)))  # original index of each row still in the batch

        for step in range(max_new_tokens):
            # Rows move between slots as others finish (_fill_holes); they are picked in their original
            # order, so that a row's random draws do not depend on its slot.
            order = torch.tensor(sorted(range(len(rows)), key=rows.__getitem__), device=device)
            tokens = torch.empty_like(order)
            tokens[order] = _pick(logits[order], temperature, top_p, generator)
            keep = []
            for j, (row, token) in enumerate(zip(rows, tokens.tolist())):
                if token in eos:
                    continue
                outputs[row].append(token)
                keep.append(j)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(rows):  # drop finished rows everywhere before the next step
                index = torch.tensor(_fill_holes(keep), device=device)
                cache.batch_select_indices(index)
                mask, next_position, tokens = mask[index], next_position[index], tokens[index]
                rows = [rows[j] for j in index.tolist()]
                mask = _trim_leading_padding(cache, mask)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
            out = forward(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position,
                          use_cache=True, **{cache_kw: cache})
            logits = out.logits[:, -1, :]
            next_position = next_position + 1
    return outputs


def score_batch(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_token_id: int,
                min_shared: int = 8, chunk: int = 1024) -> list[float]:
    """Summed log-prob of each response after its prompt (teacher forcing), for token-id lists.

    The prompts are prefilled as generate_batch prefills them (plan_prefill: shared prefixes once); each
    response then follows its prompt's rest in the last level, which runs the decoder without its head.
    Response token j sits at the row's position p and is predicted from p - 1, which lies in the last
    level (a rest keeps at least its prompt's last token). The head makes logits at those positions only,
    `chunk` positions at a time, so a batch of long responses never holds [tokens x vocabulary] at once.
    """
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("score_batch: every prompt needs at least one token")
    base, cache_kw, _ = _forward_names(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    device = next(model.parameters()).device
    with torch.inference_mode():
        plan = _plan(base, prompt_ids, min_shared)
        plan.rests = [rest + list(response) for rest, response in zip(plan.rests, response_ids)]
        cache = _new_cache(base.config, plan.width)
        out, _ = _prefill(decoder, decoder, cache_kw, cache, plan, pad_token_id, device)
        hidden, width = out.last_hidden_state, out.last_hidden_state.shape[1]
        # Rests are left-padded: response token j of row r sits at column width - len(response) + j.
        rows = [r for r, resp in enumerate(response_ids) for _ in resp]
        columns = [width - len(resp) + j for resp in response_ids for j in range(len(resp))]
        targets = [t for resp in response_ids for t in resp]
        sums = torch.zeros(len(prompt_ids), dtype=torch.float64, device=device)
        for start in range(0, len(rows), chunk):
            rr = torch.tensor(rows[start:start + chunk], device=device)
            cc = torch.tensor(columns[start:start + chunk], device=device)
            tt = torch.tensor(targets[start:start + chunk], device=device)
            logits = head(hidden[rr, cc - 1]).float()
            token_logprobs = logits.gather(1, tt[:, None])[:, 0] - torch.logsumexp(logits, -1)
            sums.index_add_(0, rr, token_logprobs.double())
    return sums.tolist()
