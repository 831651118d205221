"""Variable tracking (RULER's ``variable_tracking.py``; Hsieh et al., 2024, arXiv 2404.06654).

Chains of assignments ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... are scattered in repeated noise
("The grass is green..."); the model must list every variable that ends up holding the first chain's value. As in
RULER, a short solved example (3-letter variables, about 500 tokens) is prepended as an in-context demonstration.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tasks.base import STRING_MATCH_ALL, Question, Sample, count_tokens, sample_rng
from tasks.fit import LengthError, fit_units, within

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
QUERY = "Question: Find all variables that are assigned the value {query} in the text above."
# "assgined" is RULER's spelling, kept so prompts match the reference benchmark.
ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assgined the "
    "value {query}, they are: "
)
#: RULER fits the in-context example to 500 tokens including 30 tokens of generation.
ICL_LENGTH = 500


def _chains(
    rng: random.Random, num_chains: int, num_hops: int, name_len: int
) -> tuple[list[list[str]], list[list[str]]]:
    """Variable names and assignment statements of ``num_chains`` chains of ``num_hops`` hops (RULER's scheme)."""
    names: list[str] = []
    while len(names) < (num_hops + 1) * num_chains:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    variables, chains = [], []
    for i in range(0, len(names), num_hops + 1):
        chain_vars = names[i : i + num_hops + 1]
        statements = [f"VAR {chain_vars[0]} = {rng.randint(10000, 99998)}"]
        statements += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(num_hops)]
        variables.append(chain_vars)
        chains.append(statements)
    return variables, chains


def _noisy_text(rng: random.Random, num_noises: int, chains: list[list[str]]) -> str:
    """Insert each chain's statements, in order, at random positions among ``num_noises`` noise sentences."""
    sentences = [NOISE] * num_noises
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, pos in enumerate(positions):
            sentences.insert(pos + j, chain[j])
    return " ".join(sentences).replace(". \n", ".\n")


def _prompt(text: str, value: str, num_v: int) -> tuple[str, str, str]:
    """Context, question and answer prefix around the noisy ``text``."""
    return INSTRUCTION + text + "\n", QUERY.format(query=value), ANSWER_PREFIX.format(num_v=num_v, query=value)


@dataclass(frozen=True)
class VariableTrackingTask:
    """RULER's ``vt`` task.

    Attributes
    ----------
    name : str
        Registered name.
    num_chains : int
        Number of chains (only the first is asked about; the others are distractors).
    num_hops : int
        Assignments after the initial value, so each chain has ``num_hops + 1`` variables.
    few_shot : bool
        Prepend RULER's solved in-context example.
    """

    name: str = "vt"
    num_chains: int = 1
    num_hops: int = 4
    few_shot: bool = True
    metric: str = STRING_MATCH_ALL
    max_new_tokens: int = 30

    def _example(self, tokenizer: PreTrainedTokenizerBase, seed: int, length: int, index: int) -> str:
        """The solved demonstration, ending with RULER's separator (its answer, then four newlines)."""
        hops = min(10, self.num_hops)
        rng = sample_rng(seed, self.name, length, index, "icl")
        variables, chains = _chains(rng, self.num_chains, hops, name_len=3)
        value = chains[0][0].split("=")[-1].strip()

        def text(n: int) -> str:
            sub = sample_rng(seed, self.name, length, index, "icl", n)
            context, question, prefix = _prompt(_noisy_text(sub, n, chains), value, hops + 1)
            return context + question + prefix + " " + " ".join(variables[0])

        lo = hops + 1
        n, _ = fit_units(lambda k: count_tokens(tokenizer, text(k)), ICL_LENGTH - self.max_new_tokens, lo, ICL_LENGTH)
        return text(n) + "\n\n\n\n"

    def generate(self, tokenizer: PreTrainedTokenizerBase, length: int, index: int, seed: int = 0) -> Sample:
        """Generate one sample of about ``length`` tokens (``context + question``).

        Parameters
        ----------
        tokenizer : PreTrainedTokenizerBase
            The evaluated model's tokenizer, used to fit the amount of noise.
        length : int
            Target token count of ``context + questions[0].text``.
        index, seed : int
            Sample identity.

        Returns
        -------
        Sample
            Answers are the ``num_hops + 1`` variable names of the first chain.
        """
        rng = sample_rng(seed, self.name, length, index)
        variables, chains = _chains(rng, self.num_chains, self.num_hops, name_len=5)
        value = chains[0][0].split("=")[-1].strip()
        example = self._example(tokenizer, seed, length, index) if self.few_shot else ""
        chain_len = max(len(c) for c in chains)

        def build(n: int) -> tuple[str, str, str]:
            sub = sample_rng(seed, self.name, length, index, "noise", n)
            context, question, prefix = _prompt(_noisy_text(sub, n, chains), value, self.num_hops + 1)
            return example + context, question, prefix

        def measure(n: int) -> int:
            context, question, _ = build(n)
            return count_tokens(tokenizer, context + question)

        n, tokens = fit_units(measure, length, chain_len, max(chain_len, length))
        if not within(tokens, length):
            raise LengthError(f"{self.name}: cannot fit {length} tokens (closest: {tokens})")
        context, question, prefix = build(n)
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            context=context,
            questions=(Question(text=question, answers=tuple(variables[0]), answer_prefix=prefix),),
            metric=self.metric,
            max_new_tokens=self.max_new_tokens,
            meta={"num_noises": n, "value": value, "num_chains": self.num_chains, "num_hops": self.num_hops},
        )
