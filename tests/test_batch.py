"""ForwardBatch.build: the decode fast path gives exactly the batch the general path gives."""

import pytest
import torch

from kit.batch import ForwardBatch, SequenceInput


def _fields(b: ForwardBatch) -> dict:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in vars(b).items()}


def test_decode_fast_path_equals_the_general_path():
    decode = [SequenceInput([5], 6, [1, 2]), SequenceInput([7], 2, [3]), SequenceInput([-1], 9, [4, 5, 6])]
    fast = ForwardBatch.build(decode, 4)
    assert _fields(fast) == {
        "input_ids": [5, 7, -1], "positions": [6, 2, 9], "query_start_loc": [0, 1, 2, 3], "seq_lens": [7, 3, 10],
        "block_tables": [[1, 2, 0], [3, 0, 0], [4, 5, 6]], "slot_mapping": [2 * 4 + 2, 3 * 4 + 2, 6 * 4 + 1],
        "logits_indices": [0, 1, 2], "max_query_len": 1, "max_seq_len": 10, "block_size": 4}
    # the general path (a prefill sequence in front) lays the same decode rows after its own
    mixed = ForwardBatch.build([SequenceInput([8, 9], 0, [7])] + decode, 4)
    f = _fields(mixed)
    assert f["input_ids"][2:] == [5, 7, -1] and f["positions"][2:] == [6, 2, 9]
    assert f["slot_mapping"][2:] == _fields(fast)["slot_mapping"] and f["seq_lens"][1:] == [7, 3, 10]
    assert f["block_tables"][1:] == [[1, 2, 0], [3, 0, 0], [4, 5, 6]]
    assert f["logits_indices"] == [1, 2, 3, 4]


def test_decode_fast_path_same_length_tables_and_feeding_ids_in_place():
    b = ForwardBatch.build([SequenceInput([1], 0, [2]), SequenceInput([2], 3, [0])], 4)
    assert b.block_tables.tolist() == [[2], [0]] and b.slot_mapping.tolist() == [8, 3]
    b.input_ids[1] = 11  # the overlapped loop writes fed ids into input_ids
    assert b.input_ids.tolist() == [1, 11]


def test_decode_fast_path_validates_block_tables():
    with pytest.raises(ValueError, match="sequence 1: 1 blocks of 4 cannot hold 5 tokens"):
        ForwardBatch.build([SequenceInput([1], 0, [0]), SequenceInput([1], 4, [1])], 4)


def test_every_index_tensor_of_a_batch_starts_16_byte_aligned():
    """Triton specializes kernels on pointer alignment: views at odd int64 offsets would compile new variants."""
    for seqs in ([SequenceInput([1, 2, 3], 0, [0]), SequenceInput([4], 5, [1, 2])],
                 [SequenceInput([7], 3, [0]), SequenceInput([8], 4, [1]), SequenceInput([9], 2, [2])]):
        b = ForwardBatch.build(seqs, 16)
        for name in ("input_ids", "positions", "query_start_loc", "seq_lens", "block_tables", "slot_mapping",
                     "logits_indices"):
            assert getattr(b, name).data_ptr() % 16 == 0, name
        assert b.input_ids.tolist() == [s.token_ids[0] for s in seqs] if len(seqs) == 3 else [1, 2, 3, 4]
