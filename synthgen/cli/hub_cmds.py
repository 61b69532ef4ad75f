"""Hub commands: push."""

from __future__ import annotations

from typing import List, Optional

import typer

from synthgen.cli import app
from synthgen.cli.output import console


@app.command()
def push(
    folder: str = typer.Argument(..., help="A local dataset folder from `synthgen build`, or a save_pretrained model folder."),
    repo_id: str = typer.Argument(..., help="The Hub repo, as namespace/name (created if missing)."),
    tag: Optional[str] = typer.Option(None, "--tag", "-t", help="Tag the pushed revision, e.g. v1.0.0 (never moved once published)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (an existing repo keeps its visibility)."),
    branch: Optional[str] = typer.Option(None, "--branch", help="Commit to this branch (created from main if missing) [default: main]."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request against main instead of committing to it."),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit message."),
    force: bool = typer.Option(False, "--force", help="Publish over a repo that holds another dataset or model."),
    dataset: Optional[List[str]] = typer.Option(
        None, "--dataset", metavar="ID", help="Models: the data it was trained on, org/name[@revision] or a dataset folder (repeatable)."
    ),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Models: the Hub model it was trained from."),
) -> None:
    """Publish a dataset (or a trained pipeline) to the Hugging Face Hub as a tagged version.

    Only a complete build whose shards match their checksums is pushed, without `.synthgen/`. The
    token comes from HF_TOKEN or `hf auth login`. An interrupted push resumes when run again.
    Downstream: datasets.load_dataset(REPO_ID, revision=TAG).
    """
    from synthgen.hub import push as push_folder

    result = push_folder(
        folder, repo_id, tag=tag, private=private, branch=branch, create_pr=create_pr, message=message,
        force=force, datasets=dataset, base_model=base_model,
    )
    done = f"committed {result.commit[:12]}" if result.new_commit else f"already held this content at {result.commit[:12]}"
    console.print(
        f"[green]{result.repo_id}[/green] ({result.repo_type}): {done} on {result.revision}"
        + (f", tagged {result.tag}" if result.tag else "")
        + (f", pull request {result.pr_url}" if result.pr_url else "")
        + f"\n{result.url}",
        highlight=False,
    )
