"""``hf-signlock push DIR REPO_ID``: upload an export (model, tokenizer, bpw.json) with its model card."""

from __future__ import annotations

from .options import option


def add_parser(commands) -> None:
    """Add the ``push`` command to the ``hf-signlock`` subparsers."""
    parser = commands.add_parser("push", help="Upload an export (model, tokenizer, bpw.json) with its model card.")
    parser.add_argument("folder")
    parser.add_argument("repo_id")
    option(parser, "private", action="store_true", default=None, help="create the repo private (if it is new)")
    option(parser, "revision", default=None, help="branch to push to (created from main if missing)")
    option(parser, "create_pr", action="store_true", help="open a pull request instead of committing")
    option(parser, "commit_message", default=None, help="default: 'Upload SignLock model'")
    option(parser, "commit_description", default=None, help="longer description of the commit (default: none)")
    option(parser, "base_model", default=None, help="Hub id of the model this one was compressed from (for the card)")
    option(parser, "tags", nargs="*", default=None, help="tags added to the card's")


def run(args, rest) -> int:
    """Upload ``args.folder``; prints the commit's URL (or the pull request's)."""
    from ..hub import push_folder

    print(push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                      create_pr=args.create_pr, commit_message=args.commit_message,
                      commit_description=args.commit_description, base_model=args.base_model, tags=args.tags))
    return 0
