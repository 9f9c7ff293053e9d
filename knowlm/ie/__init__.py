"""Information extraction with KnowLM models: prompts, answer parsing, IEPile-style scoring, training data.

=================  ==========================================================================================
module             job
=================  ==========================================================================================
``prompts``        instructions for RE / NER / EE in the knowlm (KnowLM-IE templates) and oneke (IEPile JSON)
                   families, schema splitting (the chat templates around them: ``knowlm.tokenizer.chat``)
``formats``        answer formats: their descriptions and how gold answers are written in them
``parse``          model answers back into tuples; never raises, counts what it cannot read
``records``        the JSON record shapes (InstructIE / IEPile) and their tuples
``metrics``        micro P / R / F1 by IEPile's rules
``evaluate``       ``knowlm evaluate``: a predictions file against a gold file
``extract``        ``knowlm extract``: a generate function over a file of texts, batched, resumable
``kg2instruct``    ``knowlm kg2instruct``: instruction data from triples and sentences
``kg``             the small knowledge graph shipped for the quickstart, and the data made from it
``files``          reading the user's files, with one-line errors naming file and line
=================  ==========================================================================================

Nothing here imports MindSpore: the model comes in as a function from prompts to texts
(``knowlm.generate.text_generator``).
"""
