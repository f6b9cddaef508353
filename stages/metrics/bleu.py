"""Corpus BLEU with sacrebleu (its standard 13a tokenization), on a 0..1 scale like the others."""

import datasets
import evaluate


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus-level BLEU of predictions against one reference each, / 100.",
            citation="Post, A Call for Clarity in Reporting BLEU Scores, 2018",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        import sacrebleu

        if not predictions:
            return {"bleu": 0.0}
        return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100}
