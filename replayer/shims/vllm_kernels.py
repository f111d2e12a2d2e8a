"""vLLM's Triton kernels on the virtual device, where running them in Triton's interpreter will not do.

- Metadata kernels (`@exact`): Triton's interpreter runs any kernel exactly, at about a millisecond per
  program on this kind of machine; the five that vLLM's model runner launches every step (positions and
  sequence lengths, sampled-token counts, the next input ids, post-sampling bookkeeping, staged writes of
  block tables and sampling parameters), and the one every prefill launches (a prompt's input ids), cost it
  about 30 ms a step, longer than the step they describe on an H100. Each function here is its kernel's
  program body for all programs at once, on the same pointer arithmetic (`flat`: a pointer argument as the
  flat memory from its first element), in numpy over the arguments' values (a few µs an operation on such
  small arrays, a third of torch's). tests/test_vllm.py runs each against the kernel itself in the
  interpreter.
- The sampler (`@rule`): its logits have no values; the token ids come from the token oracle.

Arguments arrive by the kernel's parameter names: values (CPU tensors, written in place), scalars, None for
a pointer whose contents nobody knows (a per-request count over the vocabulary: left unknown).
"""

from __future__ import annotations

import numpy as np
import torch

from replayer.shims.triton import exact, flat, rule


def _ragged(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of `lengths` elements: each element's row and its offset within the row."""
    lengths = np.maximum(lengths, 0)
    row = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return row, np.arange(int(lengths.sum())) - starts[row]


def _mem(t: torch.Tensor) -> np.ndarray:
    """The memory a Triton pointer to `t` addresses (`flat`), as a numpy array over it: writes go through."""
    return flat(t).numpy()


def _i64(values: np.ndarray) -> np.ndarray:
    return values.astype(np.int64)


@exact("_prepare_prefill_inputs_kernel")
def _prepare_prefill_inputs(a: dict, grid: tuple):
    """A prefilling request's input ids, from its prompt (`all_token_ids`), and the prompt tokens that
    follow them (`num_lookahead`, 0 past the prompt) into `next_prefill_tokens[k, request]`. The
    speculator's kernel of the same name (other parameters) is left to the interpreter."""
    if "all_token_ids_ptr" not in a:
        return NotImplemented
    n = grid[0]
    state = _i64(_mem(a["idx_mapping_ptr"])[:n])
    prefill_len = _i64(_mem(a["prefill_lens_ptr"])[state])
    computed = _i64(_mem(a["num_computed_tokens_ptr"])[state])
    b = np.nonzero(computed < prefill_len)[0]  # the others are decoding: nothing to do
    state, prefill_len, computed = state[b], prefill_len[b], computed[b]
    query_start_loc = _mem(a["query_start_loc_ptr"])
    start = _i64(query_start_loc[b])
    query_len = _i64(query_start_loc[b + 1]) - start
    all_ids, stride = _mem(a["all_token_ids_ptr"]), a["all_token_ids_stride"]
    row, offset = _ragged(query_len)
    _mem(a["input_ids_ptr"])[start[row] + offset] = all_ids[state[row] * stride + computed[row] + offset]
    lookahead = a["num_lookahead"]
    if lookahead > 0 and len(b):
        k = np.arange(lookahead)
        pos = (computed + query_len)[:, None] + k
        inside = pos < prefill_len[:, None]
        tokens = all_ids[state[:, None] * stride + np.where(inside, pos, 0)]
        out = _mem(a["next_prefill_tokens_ptr"])
        out[k * a["next_prefill_tokens_stride"] + state[:, None]] = np.where(inside, tokens, 0)
    return None


@exact("_prepare_pos_seq_lens_kernel")
def _prepare_pos_seq_lens(a: dict, grid: tuple) -> None:
    n = grid[0] - 1  # the last program zeroes the unused sequence lengths (full CUDA graphs read them)
    seq_lens, pos = _mem(a["seq_lens_ptr"]), _mem(a["pos_ptr"])
    computed = _i64(_mem(a["num_computed_tokens_ptr"])[_i64(_mem(a["idx_mapping_ptr"])[:n])])
    query_start_loc = _i64(_mem(a["query_start_loc_ptr"])[: n + 1])
    start, query_len = query_start_loc[:-1], query_start_loc[1:] - query_start_loc[:-1]
    seq_lens[:n] = computed + query_len
    seq_lens[n : a["max_num_reqs"]] = 0
    row, offset = _ragged(query_len)
    pos[start[row] + offset] = computed[row] + offset


@exact("_get_num_sampled_and_rejected_kernel")
def _num_sampled_and_rejected(a: dict, grid: tuple) -> None:
    n = grid[0]
    sampled, rejected = _mem(a["num_sampled_ptr"]), _mem(a["num_rejected_ptr"])
    state = _i64(_mem(a["idx_mapping_ptr"])[:n])
    chunked_prefill = _mem(a["seq_lens_ptr"])[:n] < _mem(a["prefill_len_ptr"])[state]
    num_sampled = np.where(chunked_prefill, 0, sampled[:n])
    sampled[:n] = num_sampled
    cu = _i64(_mem(a["cu_num_logits_ptr"])[: n + 1])
    rejected[:n] = np.where(chunked_prefill, 0, cu[1:] - cu[:-1] - num_sampled)


@exact("_combine_sampled_and_draft_tokens_kernel")
def _combine_sampled_and_draft_tokens(a: dict, grid: tuple) -> None:
    n, new = grid[0], a["NUM_NEW_SAMPLED_TOKENS"]
    input_ids, indices = _mem(a["input_ids_ptr"]), _mem(a["logits_indices_ptr"])
    state = _i64(_mem(a["idx_mapping_ptr"])[:n])
    cu = _i64(_mem(a["cu_num_logits_ptr"])[: n + 1])
    num_logits = cu[1:] - cu[:-1]
    query_end = _i64(_mem(a["query_start_loc_ptr"])[1 : n + 1])
    logits_start = query_end - num_logits
    row, offset = _ragged(np.minimum(num_logits, a["BLOCK_SIZE"]))
    indices[cu[:-1][row] + offset] = logits_start[row] + offset
    seq_len = _i64(_mem(a["seq_lens_ptr"])[:n])
    prefill_len = _i64(_mem(a["prefill_len_ptr"])[state])
    decoding = seq_len > prefill_len  # prefill tokens take no sampled or draft token
    if new > 0:
        last = decoding & (seq_len - num_logits >= prefill_len)
        input_ids[logits_start[last]] = _mem(a["last_sampled_tokens_ptr"])[state[last]]
    num_draft = np.minimum(np.where(decoding, num_logits - new, 0), a["BLOCK_SIZE"])
    row, offset = _ragged(num_draft)
    if len(row):
        drafts = _mem(a["draft_tokens_ptr"])[state[row] * a["draft_tokens_stride"] + offset]
        input_ids[query_end[row] - num_draft[row] + offset] = drafts


@exact("_post_update_kernel")
def _post_update(a: dict, grid: tuple) -> None:
    n = grid[0]
    state = _i64(_mem(a["idx_mapping_ptr"])[:n])
    b = np.nonzero(state >= 0)[0]  # negative entries: rows to skip
    state = state[b]
    total_len, last_sampled = _mem(a["total_len_ptr"]), _mem(a["last_sampled_tokens_ptr"])
    total = _i64(total_len[state])
    num_sampled = _i64(_mem(a["num_sampled_ptr"])[b])
    sampled = _mem(a["sampled_tokens_ptr"])
    stride = a["sampled_tokens_stride"]
    some = num_sampled > 0
    last_sampled[state[some]] = sampled[b[some] * stride + num_sampled[some] - 1]
    total_len[state[some]] = (total + num_sampled)[some]
    row, offset = _ragged(num_sampled)
    tokens = sampled[b[row] * stride + offset]
    all_ids = _mem(a["all_token_ids_ptr"])
    all_ids[state[row] * a["all_token_ids_stride"] + total[row] + offset] = tokens
    counts = a["output_bin_counts_ptr"]
    if counts is not None:  # known (small vocabularies): count each sampled token
        np.add.at(_mem(counts), state[row] * a["output_bin_counts_stride"] + _i64(tokens), 1)
    query_len = np.zeros_like(b)
    if a["query_start_loc_ptr"] is not None:
        query_start_loc = _mem(a["query_start_loc_ptr"])
        query_len = _i64(query_start_loc[b + 1]) - _i64(query_start_loc[b])
    computed = _mem(a["num_computed_tokens_ptr"])
    delta = query_len - _i64(_mem(a["num_rejected_ptr"])[b])
    computed[state] = _i64(computed[state]) + delta


@exact("_apply_write_kernel")
def _apply_write(a: dict, grid: tuple):
    """vLLM's staged writes (sampling parameters, block tables): program i copies its slice of the contents
    into row `write_indices[i]` from column `write_starts[i]`. Writes into several tensors at once
    (`MULTI_GROUP`, through a table of their addresses) are left to the interpreter."""
    if a["MULTI_GROUP"] or a["output_ptr"].dtype == torch.bfloat16:  # numpy has no bfloat16
        return NotImplemented
    n = grid[0]
    out = _mem(a["output_ptr"])
    cu_end = _i64(_mem(a["write_cu_lens_ptr"])[:n])
    cu_start = np.concatenate([np.zeros(1, np.int64), cu_end[:-1]])
    row, offset = _ragged(cu_end - cu_start)
    rows = _i64(_mem(a["write_indices_ptr"])[:n])
    starts = _i64(_mem(a["write_starts_ptr"])[:n])
    contents = _mem(a["write_contents_ptr"])[cu_start[row] + offset]
    out[rows[row] * a["output_stride"] + starts[row] + offset] = contents
    return None


@rule("_gumbel_sample_kernel")
def _gumbel_sample(a: dict, emu) -> None:
    """vLLM's sampler: each (token, vocabulary block) program writes its block's argmax; every block gets
    the oracle's token, so whichever block wins, the token is the oracle's."""
    out = a["local_argmax_ptr"]
    rows, blocks = out.shape
    ids = emu.oracle.token_ids((rows,), int(a["vocab_size"]), "triton::_gumbel_sample_kernel")
    out._value = ids.to(out.dtype)[:, None].expand(rows, blocks).clone()
    out._vstorage.value = True
