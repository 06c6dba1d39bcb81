"""Python client of the o2u noise-scoring service: submit datasets for O2U-Net scoring, follow
their progress, and read back ranked noise scores and dataset health, over gRPC.

    with Client("localhost:50051") as client:
        job = client.submit("file:///data/batch.npz", model="mlp", seed=1)
        job = client.wait(job.job_id)
        for score in client.scores(job.job_id, top_k=20):
            print(score.rank, score.key, score.given_label, score.suggested_label)
"""

from o2u_client.client import Client
from o2u_client.converters import build_config, build_dataset_options
from o2u_client.errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    O2UError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from o2u_client.models import (
    Event,
    EventType,
    Job,
    JobError,
    JobState,
    Progress,
    RunInfo,
    SkippedRecords,
    Stage,
)
from o2u_client.results import (
    ClassNoise,
    CleanRetraining,
    ConfusedPair,
    DatasetSummary,
    ExportResult,
    JobPage,
    NoiseScore,
    ScorePage,
)

__version__ = "0.1.0"

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "ClassNoise",
    "CleanRetraining",
    "Client",
    "ConfusedPair",
    "DatasetSummary",
    "DeadlineExceededError",
    "Event",
    "EventType",
    "ExportResult",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JobError",
    "JobPage",
    "JobState",
    "NoiseScore",
    "NotFoundError",
    "O2UError",
    "PermissionDeniedError",
    "Progress",
    "ResourceExhaustedError",
    "RunInfo",
    "ScorePage",
    "SkippedRecords",
    "Stage",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
    "build_config",
    "build_dataset_options",
]
