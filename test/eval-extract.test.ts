// Answer extraction for generation tasks (src/eval/extract.ts): lm-evaluation-harness's gsm8k filters on
// hand-made completions, number normalization, the GSM8K target and exact match.
import {test, describe} from "node:test";
import assert from "node:assert/strict";
import {readFileSync} from "node:fs";
import path from "node:path";
import {gunzipSync} from "node:zlib";
import {QloraError} from "../src/errors.js";
import {
    GSM8K_FLEXIBLE,
    GSM8K_STRICT,
    GSM8K_STRICT_HASH,
    applyFilter,
    exactMatch,
    extractAnswer,
    gsm8kTarget,
    normalizeNumber
} from "../src/eval/extract.js";
import {DATASETS} from "./helpers/paths.js";

/** [strict "The answer is", strict "####", flexible] for a completion */
function extractAll(completion: string): [string | null, string | null, string | null] {
    return [
        applyFilter(completion, GSM8K_STRICT),
        applyFilter(completion, GSM8K_STRICT_HASH),
        applyFilter(completion, GSM8K_FLEXIBLE)
    ];
}

describe("GSM8K filters on hand-made completions", () => {
    test('a correct completion ending "#### 42"', () => {
        const completion = "Tom has 40 apples and buys 2 more, so 40 + 2 = <<40+2=42>>42.\n#### 42";
        assert.deepEqual(extractAll(completion), [null, "42", "42"]);
        assert.ok(exactMatch(applyFilter(completion, GSM8K_STRICT_HASH), "42"));
        assert.ok(exactMatch(applyFilter(completion, GSM8K_FLEXIBLE), "42"));
        assert.ok(!exactMatch(applyFilter(completion, GSM8K_STRICT), "42"), "no 'The answer is': strict-match misses");
    });

    test('a correct chain-of-thought completion "The answer is 42."', () => {
        const completion = "There are 6 boxes of 7 eggs. 6 * 7 = 42. The answer is 42.";
        assert.deepEqual(extractAll(completion), ["42", null, "42."]);
        assert.ok(exactMatch(applyFilter(completion, GSM8K_STRICT), "42"));
        assert.ok(exactMatch(applyFilter(completion, GSM8K_FLEXIBLE), "42")); // "42." loses its trailing point
    });

    test('strict-match needs a character after the number, as lm-evaluation-harness\'s "." does', () => {
        // at the very end of a completion the "." takes the last digit: lm-evaluation-harness reads "4" here too
        assert.equal(applyFilter("So the answer is clear. The answer is 42", GSM8K_STRICT), "4");
        assert.equal(applyFilter("The answer is 7", GSM8K_STRICT), null);
        assert.equal(applyFilter("The answer is 42!", GSM8K_STRICT), "42");
        // the class is greedy, then gives back the final "." for the pattern's "." (which never takes a line break)
        assert.equal(applyFilter("The answer is 1,000.\n", GSM8K_STRICT), "1,000");
    });

    test('"$1,000" matches a target of 1000 (flexible); strict-match does not take "$"', () => {
        const completion = "Each of the 4 tickets costs $250, so she pays 4 * 250 = $1,000. The answer is $1,000.";
        assert.deepEqual(extractAll(completion), [null, null, "$1,000."]);
        assert.ok(exactMatch(applyFilter(completion, GSM8K_FLEXIBLE), "1000"));
        assert.ok(exactMatch(applyFilter(completion, GSM8K_FLEXIBLE), gsm8kTarget("4 * 250 = 1000\n#### 1,000")));
    });

    test("several numbers: flexible takes the last, strict the first", () => {
        const completion = "She had 5 apples and bought 12 more: 5 + 12 = 17 apples. The answer is 17. The answer is 18.";
        // "17. " gives "17." (the pattern's "." takes the space); the point goes in normalization
        assert.deepEqual(extractAll(completion), ["17.", null, "18."]);
        assert.ok(exactMatch(applyFilter(completion, GSM8K_STRICT), "17"));
        assert.ok(!exactMatch(applyFilter(completion, GSM8K_FLEXIBLE), "17"));
        // a single digit is a number too (the second alternative of the pattern)
        assert.equal(applyFilter("Numbers 10, 20 and then 7 apples", GSM8K_FLEXIBLE), "7");
    });

    test("wrong answers do not match", () => {
        const completion = "16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars. The answer is 19.";
        assert.equal(applyFilter(completion, GSM8K_STRICT), "19");
        assert.ok(!exactMatch(applyFilter(completion, GSM8K_STRICT), "18"));
        assert.ok(!exactMatch("180", "18"));
        assert.ok(!exactMatch("1.8", "18"));
        assert.ok(!exactMatch("-18", "18"));
    });

    test("no number at all: null, which never matches", () => {
        const completion = "I am not sure how to solve this problem.";
        assert.deepEqual(extractAll(completion), [null, null, null]);
        assert.ok(!exactMatch(null, "42"));
        assert.ok(!exactMatch(applyFilter("", GSM8K_FLEXIBLE), "0"));
    });

    test("negative and decimal answers", () => {
        const completion = "The temperature went from 4.5 to -3.50 degrees. The answer is -3.50.";
        assert.deepEqual(extractAll(completion), ["-3.50", null, "-3.50."]);
        assert.ok(exactMatch(applyFilter(completion, GSM8K_STRICT), "-3.5"));
        assert.ok(exactMatch(applyFilter(completion, GSM8K_FLEXIBLE), gsm8kTarget("#### -3.5")));
        assert.ok(!exactMatch(applyFilter(completion, GSM8K_FLEXIBLE), "3.5"), "the sign is kept");
        assert.ok(exactMatch(applyFilter("Half of one is 0.5", GSM8K_FLEXIBLE), ".5"));
    });

    test("the presets are lm-evaluation-harness's filters", () => {
        assert.deepEqual(
            [GSM8K_STRICT.regex, GSM8K_STRICT.group, GSM8K_STRICT.name],
            ["The answer is (\\-?[0-9\\.\\,]+).", 0, "strict-match"]
        );
        assert.deepEqual([GSM8K_STRICT_HASH.regex, GSM8K_STRICT_HASH.group], ["#### (\\-?[0-9\\.\\,]+)", 0]);
        assert.deepEqual(
            [GSM8K_FLEXIBLE.regex, GSM8K_FLEXIBLE.group, GSM8K_FLEXIBLE.name],
            ["(-?[$0-9.,]{2,})|(-?[0-9]+)", -1, "flexible-extract"]
        );
        for (const f of [GSM8K_STRICT, GSM8K_STRICT_HASH, GSM8K_FLEXIBLE]) assert.match(f.source, /lm_eval\/tasks\/gsm8k\//);
    });
});

describe("extractAnswer", () => {
    const text = "a=1 b=22 c=333";
    test("the last match by default; group picks a match by index, negative from the end", () => {
        assert.equal(extractAnswer(text, "=(\\d+)"), "333");
        assert.equal(extractAnswer(text, "=(\\d+)", 0), "1");
        assert.equal(extractAnswer(text, "=(\\d+)", 1), "22");
        assert.equal(extractAnswer(text, "=(\\d+)", -2), "22");
        assert.equal(extractAnswer(text, "=(\\d+)", 3), null);
        assert.equal(extractAnswer(text, "=(\\d+)", -4), null);
    });

    test("the whole match when the pattern has no group; the first non-empty group otherwise; stripped", () => {
        assert.equal(extractAnswer(text, "[a-z]=\\d+", 0), "a=1");
        assert.equal(extractAnswer(text, "(x)?=(\\d+)", 0), "1");
        assert.equal(extractAnswer("answer:  7  \n", "answer:(.*)"), "7");
        assert.equal(extractAnswer("answer:   \n", "answer:(.*)"), null, "an empty capture is no answer");
    });

    test("a RegExp without the g flag, Python named groups and leading inline flags", () => {
        assert.equal(extractAnswer(text, /=(\d+)/), "333");
        assert.equal(extractAnswer("ANSWER: B", "(?i)answer: (?P<letter>[A-D])"), "B");
        assert.equal(extractAnswer("x\nFinal: 9", "(?s)x.Final: (\\d)"), "9");
    });

    test("a regex JavaScript cannot read is a QloraError naming it", () => {
        assert.throws(
            () => extractAnswer(text, "=(\\d+"),
            (err: unknown) => err instanceof QloraError && /regex "=\(\\\\d\+" is not a valid regex/.test(err.message)
        );
        assert.throws(
            () => extractAnswer(text, "(?x) = (\\d+)"),
            (err: unknown) => err instanceof QloraError && /inline flag\(s\) "x"/.test(err.message)
        );
    });
});

describe("normalizeNumber", () => {
    test("canonical numeric form", () => {
        const cases: [string, string][] = [
            ["1,000.00", "1000"],
            ["1000", "1000"],
            ["$1,000", "1000"],
            [" 42 ", "42"],
            ["42.", "42"],
            ["-7", "-7"],
            ["- 7", "-7"],
            ["$-7.25", "-7.25"],
            ["-0.0", "0"],
            ["007", "7"],
            ["3.140", "3.14"],
            [".5", "0.5"],
            ["+5", "5"],
            ["1,450,000", "1450000"]
        ];
        for (const [input, expected] of cases) assert.equal(normalizeNumber(input), expected, JSON.stringify(input));
        assert.equal(normalizeNumber("1,000.00"), normalizeNumber("1000"));
    });

    test("what is not a number stays text, lower case", () => {
        assert.equal(normalizeNumber("1.2.3"), "1.2.3");
        assert.equal(normalizeNumber("Paris."), "paris");
        assert.equal(normalizeNumber("."), "");
        assert.equal(normalizeNumber("-"), "-");
        assert.ok(exactMatch("Paris", "paris"));
    });
});

describe("gsm8kTarget", () => {
    test("the number after ####", () => {
        assert.equal(gsm8kTarget("16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = $<<9*2=18>>18\n#### 18"), "18");
        assert.equal(gsm8kTarget("...\n#### 1,450,000"), "1450000");
        assert.equal(gsm8kTarget("#### -3"), "-3");
    });

    test("an answer without a final number is a QloraError naming the record", () => {
        assert.throws(
            () => gsm8kTarget("She makes 18 dollars.", "gsm8k_test.jsonl line 3"),
            (err: unknown) =>
                err instanceof QloraError &&
                err.message.startsWith("gsm8k_test.jsonl line 3: ") &&
                err.message.includes('must end with "#### <number>"') &&
                err.message.includes("She makes 18 dollars.")
        );
        assert.throws(
            () => gsm8kTarget("#### eighteen"),
            (err: unknown) => err instanceof QloraError && err.message.includes('followed by "eighteen"')
        );
    });

    test("every record of the GSM8K test split: a target, and the reference solution extracts to it", () => {
        const lines = gunzipSync(readFileSync(path.join(DATASETS, "eval", "gsm8k_test.jsonl.gz")))
            .toString("utf8")
            .trim()
            .split("\n");
        assert.equal(lines.length, 1319);
        let withComma = 0;
        lines.forEach((line, i) => {
            const {answer} = JSON.parse(line) as {answer: string};
            const target = gsm8kTarget(answer, `gsm8k_test.jsonl line ${i + 1}`);
            assert.match(target, /^-?\d+$/, `line ${i + 1}`);
            if (/#### .*,/.test(answer)) withComma++;
            // the dataset's own solution ends "#### N": both gsm8k filters must score it correct
            assert.ok(exactMatch(applyFilter(answer, GSM8K_STRICT_HASH), target), `line ${i + 1} strict`);
            assert.ok(exactMatch(applyFilter(answer, GSM8K_FLEXIBLE), target), `line ${i + 1} flexible`);
        });
        assert.equal(withComma, 14); // "#### 1,450,000" and the like: the comma must go
    });
});
