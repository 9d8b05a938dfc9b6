"""The workflows that combine everything below them for one command: `check` (what is wrong with a photo set),
`compare` (which backbone suits it), `report` (a trained model's page, with `report_html`, `report_train` and
`report_multilabel`). They take a fitted `ImageClassifier` or typed records and import what they use directly.
"""
