"""kit/sampled_batch.py: the host view of a sampler pass, with and without top-k logprobs."""

import torch

from kit.sampled_batch import SampledBatch, to_device


def test_result_reads_tokens_and_logprobs_column_wise():
    packed = torch.tensor([[7.0, -0.5], [123456.0, -1.25]], dtype=torch.float64)
    out = SampledBatch(torch.tensor([7, 123456]), packed, [None, None]).result()
    assert out.token_ids == [7, 123456] and all(type(t) is int for t in out.token_ids)
    assert out.logprobs == [-0.5, -1.25] and out.top_logprobs == [None, None]


def test_result_top_logprobs_keep_each_rows_own_k_and_the_sampled_token():
    # (R, 2 + 2 * max_k): token, logprob, top-2 logprobs, top-2 ids
    packed = torch.tensor([[5.0, -0.1, -0.1, -2.0, 5.0, 9.0],
                           [3.0, -3.0, -0.2, -1.0, 4.0, 8.0]], dtype=torch.float64)
    out = SampledBatch(torch.tensor([5, 3]), packed, [1, None]).result()
    assert out.top_logprobs == [{5: -0.1}, None]
    out = SampledBatch(torch.tensor([5, 3]), packed, [2, 1]).result()
    assert out.top_logprobs == [{5: -0.1, 9: -2.0}, {4: -0.2, 3: -3.0}]


def test_to_device_on_the_cpu_is_a_plain_tensor():
    t = to_device([[1, 2], [3, 4]], "cpu")
    assert t.dtype == torch.long and t.tolist() == [[1, 2], [3, 4]]
