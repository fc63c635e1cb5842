"""A trained run's models after training: generate reports, MLflow pyfunc models, serving.

    predictor.py  pure: encoded images -> the 14 findings with probabilities + a report
    sources.py    a run folder or an MLflow model URI -> a predictor
    pyfunc.py     the MLflow pyfunc model (PNG bytes in, findings + report out) and logging
                  a run's generic and personalized models to MLflow at the end of a run

docs/models.md explains them for users.
"""
